"""The checks a node makes of a step before computing it, called directly on a real span and a
real session: each names what is wrong, and a good step passes them all."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from corolla.errors import InvalidInput
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.messages import OpenSession
from corolla.node.sessions import Session, SessionConfig, SessionTable
from corolla.node.step_checks import (
    check_input,
    check_next_step,
    check_one_shot,
    check_open,
    check_request,
    check_session_owner,
    requested_span,
)
from corolla.verify.digests import tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import StepRequest, sign_request
from corolla.version import PROTOCOL_VERSION

CLIENT = Identity.generate()
SESSION_ID = os.urandom(16)


@pytest.fixture(scope="module")
def span(bloom_dir) -> Span:
    return load_span(bloom_dir, 0, 2)


def _request(span: Span, hidden: torch.Tensor, **overrides) -> StepRequest:
    fields = dict(
        protocol_version=PROTOCOL_VERSION,
        model_digest=span.model_digest,
        span_digest=span.digest,
        start=span.start,
        end=span.end,
        session_id=SESSION_ID,
        step=0,
        position=0,
        tokens=hidden.shape[0] * hidden.shape[1],
        input_digest=tensor_digest(hidden),
    )
    fields.update(overrides)
    return sign_request(fields.pop("signer", CLIENT), **fields)


def _session(span: Span, batch: int = 1, max_length: int = 8) -> Session[object]:
    table: SessionTable[object] = SessionTable(SessionConfig())
    return table.open(SESSION_ID, CLIENT.public_key, batch, max_length, span)


def test_a_good_step_passes_every_check(span):
    hidden = torch.randn(2, 3, span.hidden_size)
    request = _request(span, hidden)
    session = _session(span, batch=2)
    check_session_owner(session, request)
    assert check_request(request, hidden, span) == (2, 3)
    check_next_step(session, request, 2, 3)
    check_one_shot(request, 3, span)
    check_input(request, hidden)


def test_a_client_may_ask_for_part_of_the_span_and_nothing_outside_it(span):
    part = requested_span(span, 1, 2)
    assert (part.start, part.end, part.num_blocks) == (1, 2, 1)
    assert part.digest != span.digest
    for start, end in [(0, 3), (2, 2), (1, 0)]:
        with pytest.raises(InvalidInput, match=r"serves blocks \[0, 2\)"):
            requested_span(span, start, end)


def test_opening_names_blocks_it_serves_and_a_length_the_model_allows(span):
    opening = OpenSession(SESSION_ID, 1, span.max_length, 1, 2, CLIENT.public_key)
    assert (check_open(opening, span).start, check_open(opening, span).end) == (1, 2)
    with pytest.raises(InvalidInput, match="exceeds the model's"):
        check_open(dataclasses.replace(opening, max_length=span.max_length + 1), span)
    with pytest.raises(InvalidInput, match="serves blocks"):
        check_open(dataclasses.replace(opening, end=3), span)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"protocol_version": PROTOCOL_VERSION + 1}, "protocol version"),
        ({"model_digest": bytes(32)}, "another model"),
        ({"start": 1}, "blocks other than"),
        ({"span_digest": bytes(32)}, "span digest"),
        ({"tokens": 5}, "claims 5 tokens"),
    ],
)
def test_a_request_that_does_not_match_the_blocks_it_runs_is_refused(span, overrides, message):
    hidden = torch.randn(1, 3, span.hidden_size)
    with pytest.raises(InvalidInput, match=message):
        check_request(_request(span, hidden, **overrides), hidden, span)


@pytest.mark.parametrize(
    ("hidden", "message"),
    [
        (torch.randn(3, 64), r"\[batch, tokens, hidden\]"),
        (torch.randn(1, 3, 32), "hidden size 32"),
        (torch.randn(1, 3, 64, dtype=torch.float64), "must be torch.float32"),
    ],
)
def test_hidden_states_of_the_wrong_shape_or_dtype_are_refused(span, hidden, message):
    request = _request(span, torch.randn(1, 3, span.hidden_size))
    with pytest.raises(InvalidInput, match=message):
        check_request(request, hidden, span)


def test_a_step_belongs_to_its_session_and_its_client(span):
    hidden = torch.randn(1, 1, span.hidden_size)
    session = _session(span)
    with pytest.raises(InvalidInput, match="unknown session"):
        check_session_owner(session, _request(span, hidden, session_id=os.urandom(16)))
    with pytest.raises(InvalidInput, match="another client"):
        check_session_owner(session, _request(span, hidden, signer=Identity.generate()))


def test_a_step_continues_the_session_where_it_is_and_within_its_length(span):
    hidden = torch.randn(1, 3, span.hidden_size)
    session = _session(span, batch=1, max_length=8)
    request = _request(span, hidden)
    with pytest.raises(InvalidInput, match="batch of 2"):
        check_next_step(session, request, 2, 3)
    with pytest.raises(InvalidInput, match="at position 3, the session at 0"):
        check_next_step(session, _request(span, hidden, position=3), 1, 3)
    with pytest.raises(InvalidInput, match="0 \\+ 9 tokens exceed"):
        check_next_step(session, request, 1, 9)
    span.forward(torch.randn(1, 6, span.hidden_size), session.cache)
    with pytest.raises(InvalidInput, match="6 \\+ 3 tokens exceed"):
        check_next_step(session, _request(span, hidden, position=6), 1, 3)
    check_next_step(session, _request(span, hidden[:, :2], position=6), 1, 2)


def test_a_one_shot_forward_starts_at_zero_and_fits_the_context(span):
    hidden = torch.randn(1, 2, span.hidden_size)
    with pytest.raises(InvalidInput, match="starts at position 0"):
        check_one_shot(_request(span, hidden, position=1), 2, span)
    with pytest.raises(InvalidInput, match="exceed the model's context"):
        check_one_shot(_request(span, hidden), span.max_length + 1, span)


def test_the_input_must_be_what_the_client_signed_and_finite(span):
    hidden = torch.randn(1, 2, span.hidden_size)
    with pytest.raises(InvalidInput, match="input digest"):
        check_input(_request(span, hidden), hidden + 1)
    broken = hidden.clone()
    broken[0, 1, 5] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        check_input(_request(span, broken), broken)
