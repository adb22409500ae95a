"""Per-step ticket admission, called directly on a real ticket book and real signed tickets: which
queue a step runs in, what it is charged, and the note a client gets when it runs free."""

from __future__ import annotations

import os
import time

import pytest

from corolla.node.admission import admit_step, opened_priority
from corolla.node.scheduler import Priority
from corolla.node.ticket_book import HonouredTicket, TicketBook, TicketConfig
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity
from corolla.verify.receipts import StepRequest, sign_request
from corolla.verify.tickets import issue_ticket
from corolla.version import PROTOCOL_VERSION

LEDGER = Identity.generate()
CLIENT = Identity.generate()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _honoured(book: TicketBook, budget: int, lifetime_s: float = 3600) -> HonouredTicket:
    expiry = int((book.clock() + lifetime_s) * 1000)
    ticket = issue_ticket(LEDGER, CLIENT.public_key, budget, 1, expiry, os.urandom(32))
    admission = book.admit(canonical(ticket.to_value()), CLIENT.public_key)
    assert admission.ticket is not None, admission.note
    return admission.ticket


def _request(tokens: int, ticket_digest: bytes | None) -> StepRequest:
    """A step over blocks 0:2: it costs 2 x ``tokens`` block-tokens."""
    return sign_request(
        CLIENT,
        protocol_version=PROTOCOL_VERSION,
        model_digest=bytes(32),
        span_digest=bytes(32),
        start=0,
        end=2,
        session_id=os.urandom(16),
        step=0,
        position=0,
        tokens=tokens,
        input_digest=bytes(32),
        ticket_digest=ticket_digest,
    )


@pytest.fixture
def book() -> TicketBook:
    return TicketBook(TicketConfig(ledger_key=LEDGER.public_key), clock=Clock())


def test_a_session_without_a_ticket_runs_free_and_is_charged_nothing(book):
    admission = admit_step(None, _request(3, None), book)
    assert (admission.priority, admission.charged, admission.note) == (Priority.FREE, None, "")
    assert not admission.drops_ticket
    assert opened_priority(None) == "free"


def test_a_step_naming_the_sessions_ticket_runs_high_and_is_charged_its_block_tokens(book):
    ticket = _honoured(book, budget=100)
    admission = admit_step(ticket, _request(3, ticket.digest), book)
    assert (admission.priority, admission.charged, admission.note) == (Priority.HIGH, ticket, "")
    assert ticket.used == 6 and book.used(ticket.digest) == 6
    assert opened_priority(ticket) == "high"


def test_a_step_not_naming_the_ticket_runs_free_is_not_charged_and_keeps_the_ticket(book):
    ticket = _honoured(book, budget=100)
    for digest in (None, os.urandom(32)):
        admission = admit_step(ticket, _request(3, digest), book)
        assert (admission.priority, admission.charged) == (Priority.FREE, None)
        assert "does not name the session's ticket" in admission.note
        assert not admission.drops_ticket
    assert ticket.used == 0
    assert admit_step(ticket, _request(3, ticket.digest), book).priority == Priority.HIGH


def test_a_ticket_that_cannot_pay_a_step_is_dropped_and_the_step_runs_free(book):
    ticket = _honoured(book, budget=10)
    assert admit_step(ticket, _request(4, ticket.digest), book).priority == Priority.HIGH
    admission = admit_step(ticket, _request(2, ticket.digest), book)  # 8 used, needs 4 more
    assert (admission.priority, admission.charged) == (Priority.FREE, None)
    assert admission.drops_ticket
    assert "budget is used up" in admission.note and "free priority from now on" in admission.note
    assert ticket.used == 8


def test_an_expired_ticket_is_dropped_and_the_step_runs_free(book):
    ticket = _honoured(book, budget=100, lifetime_s=10)
    book.clock.now += 11
    admission = admit_step(ticket, _request(1, ticket.digest), book)
    assert (admission.priority, admission.drops_ticket) == (Priority.FREE, True)
    assert "expired" in admission.note and ticket.used == 0
