"""The node's ticket book: which priority tickets it honours, how much of each it has served,
and the ticketed work waiting to be redeemed at the ledger.

A client attaches a ticket (:class:`corolla.verify.tickets.Ticket`, encoded with
``canonical(ticket.to_value())``) to the ``open`` message of a session. :meth:`TicketBook.admit`
honours it only if all of these hold, checked in this order:

1. the node trusts a ledger (``--ledger-key HEX``, or the key ``--ledger URL`` reports);
2. the bytes decode to a ticket;
3. the ticket names the trusted ledger's key, and the ledger's signature over it verifies;
4. its client key is the session's client key;
5. it has not expired (``expiry`` is unix milliseconds, the node's clock);
6. this node's own count of the block-tokens served under it is below its budget.

Anything else opens the session at free priority with a note saying why: a ticket never makes
a session fail. Every step served at high priority is charged ``tokens x blocks`` block-tokens
(:meth:`TicketBook.charge`) against a count shared by all sessions of that ticket on this node;
a step that would go over the budget, or comes after the expiry, is served free instead and the
session stays free. The (request, receipt) pairs of charged steps wait in :attr:`earned`
(bounded: the oldest go first, counted in :attr:`dropped`) until
:class:`corolla.node.settlement.Settlement` redeems them. Everything here runs on the node's event
loop, so no locks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from corolla.errors import CorollaError, InvalidInput
from corolla.verify.encoding import decode
from corolla.verify.identity import PUBLIC_KEY_SIZE, peer_name_of
from corolla.verify.receipts import Receipt, StepRequest, work_units
from corolla.verify.tickets import Ticket, verify_ticket

__all__ = [
    "Admission",
    "Earned",
    "HonouredTicket",
    "TicketBook",
    "TicketConfig",
    "decode_ticket",
    "parse_ledger_key",
]

_TICKET_ITEMS = 32
"""Most values a ticket's encoding holds (it has 7 fields)."""


def parse_ledger_key(text: str) -> bytes:
    """A ledger's public key from 64 hex digits; :class:`InvalidInput` otherwise."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != PUBLIC_KEY_SIZE:
        raise InvalidInput(
            f"--ledger-key must be the ledger's public key as {2 * PUBLIC_KEY_SIZE} hex digits"
        )
    return key


def decode_ticket(raw: bytes) -> Ticket:
    """The ticket in ``raw`` (``canonical(ticket.to_value())``); :class:`InvalidInput` if not."""
    return Ticket.from_value(decode(raw, max_items=_TICKET_ITEMS))


@dataclass(frozen=True)
class TicketConfig:
    """Which ledger's tickets a node honours, and how much it remembers."""

    ledger_key: bytes | None = None
    """Public key of the ledger whose tickets are honoured; None: no ticket is."""
    max_tickets: int = 10_000
    """Tickets counted at most (expired ones are forgotten first)."""
    max_earned: int = 20_000
    """Ticketed steps kept for redemption at most; beyond, the oldest are dropped."""

    def __post_init__(self) -> None:
        if self.ledger_key is not None and (
            not isinstance(self.ledger_key, bytes) or len(self.ledger_key) != PUBLIC_KEY_SIZE
        ):
            raise InvalidInput(f"the ledger key must be {PUBLIC_KEY_SIZE} bytes")
        if self.max_tickets < 1 or self.max_earned < 1:
            raise InvalidInput("max_tickets and max_earned must be at least 1")


@dataclass
class HonouredTicket:
    """A ticket this node honours, and the block-tokens it served under it so far."""

    ticket: Ticket
    digest: bytes
    used: int = 0

    @property
    def left(self) -> int:
        return self.ticket.budget - self.used


@dataclass(frozen=True)
class Admission:
    """What :meth:`TicketBook.admit` decided: the honoured ticket (None: free) and why."""

    ticket: HonouredTicket | None
    note: str

    @property
    def priority(self) -> str:
        return "high" if self.ticket is not None else "free"


@dataclass(frozen=True)
class Earned:
    """One ticketed step served: what the ledger pays for, at ``price`` points a block-token."""

    request: StepRequest
    receipt: Receipt
    price: int
    units: int


@dataclass
class TicketBook:
    """Tickets honoured by this node, their use, and the ticketed work not yet redeemed."""

    config: TicketConfig = field(default_factory=TicketConfig)
    clock: Callable[[], float] = time.time
    """Seconds since the epoch (tests move it)."""
    ledger_key: bytes | None = None
    """The trusted ledger's key (from the config, or learnt later with :meth:`trust`)."""
    earned: deque[Earned] = field(default_factory=deque)
    dropped: int = 0
    """Ticketed steps dropped unredeemed because too many were waiting (since last read)."""
    _tickets: dict[bytes, HonouredTicket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ledger_key is None:
            self.ledger_key = self.config.ledger_key

    def trust(self, ledger_key: bytes) -> None:
        """Honour tickets of the ledger with this key from now on."""
        if len(ledger_key) != PUBLIC_KEY_SIZE:
            raise InvalidInput(f"the ledger key must be {PUBLIC_KEY_SIZE} bytes")
        self.ledger_key = ledger_key

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def used(self, digest: bytes) -> int:
        """Block-tokens this node served under the ticket with this digest."""
        honoured = self._tickets.get(digest)
        return 0 if honoured is None else honoured.used

    # ------------------------------------------------------------------ at open

    def admit(self, raw: bytes | None, client_key: bytes) -> Admission:
        """Whether a session of ``client_key`` opened with ticket bytes ``raw`` runs high."""
        if raw is None:
            return Admission(None, "")
        if self.ledger_key is None:
            return _free("this node trusts no ledger, so it honours no ticket")
        try:
            ticket = decode_ticket(raw)
        except (CorollaError, ValueError, TypeError) as error:
            return _free(f"the ticket is unreadable ({str(error)[:120]})")
        if ticket.ledger_key != self.ledger_key:
            return _free(
                f"the ticket is signed by ledger {peer_name_of(ticket.ledger_key)}, this node "
                f"trusts ledger {peer_name_of(self.ledger_key)}"
            )
        try:
            verify_ticket(ticket, ledger_key=self.ledger_key)
        except CorollaError:
            return _free("the ledger's signature on the ticket does not verify (forged?)")
        if ticket.client_key != client_key:
            return _free(
                f"the ticket belongs to client {peer_name_of(ticket.client_key)}, "
                f"not to this session's client {peer_name_of(client_key)}"
            )
        if self.now_ms() > ticket.expiry:
            return _free("the ticket has expired")
        honoured = self._account(ticket)
        if honoured is None:
            return _free("this node counts too many tickets already")
        if honoured.left <= 0:
            return _free(
                f"the ticket's budget of {ticket.budget} block-tokens is used up on this node"
            )
        return Admission(
            honoured,
            f"ticket honoured: high priority, {honoured.left} of {ticket.budget} block-tokens "
            "left on this node",
        )

    def _account(self, ticket: Ticket) -> HonouredTicket | None:
        digest = ticket.digest()
        honoured = self._tickets.get(digest)
        if honoured is not None:
            return honoured
        if len(self._tickets) >= self.config.max_tickets:
            now = self.now_ms()
            for key in [k for k, h in self._tickets.items() if h.ticket.expiry < now]:
                del self._tickets[key]
            if len(self._tickets) >= self.config.max_tickets:
                return None
        honoured = HonouredTicket(ticket, digest)
        self._tickets[digest] = honoured
        return honoured

    # ------------------------------------------------------------------ per step

    def charge(self, honoured: HonouredTicket, units: int) -> str | None:
        """Count ``units`` block-tokens against the ticket; the reason if it cannot take them."""
        if self.now_ms() > honoured.ticket.expiry:
            return "the ticket has expired"
        if units > honoured.left:
            return (
                f"the ticket's budget is used up on this node ({honoured.left} of "
                f"{honoured.ticket.budget} block-tokens left, this step needs {units})"
            )
        honoured.used += units
        return None

    def refund(self, honoured: HonouredTicket, units: int) -> None:
        """Give back a charge whose step was not served."""
        honoured.used = max(0, honoured.used - units)

    def record(self, honoured: HonouredTicket, request: StepRequest, receipt: Receipt) -> None:
        """Keep a charged step's pair for redemption (dropping the oldest beyond the cap)."""
        self._keep([Earned(request, receipt, honoured.ticket.price, work_units(request))])

    # ------------------------------------------------------------------ settlement

    def take(self, count: int) -> list[Earned]:
        """Up to ``count`` of the oldest pairs waiting for redemption (removed)."""
        return [self.earned.popleft() for _ in range(min(count, len(self.earned)))]

    def put_back(self, items: Iterable[Earned]) -> None:
        """Return pairs taken but not redeemed (the ledger was unreachable), oldest first."""
        self.earned.extendleft(reversed(list(items)))
        self._trim()

    def _keep(self, items: list[Earned]) -> None:
        self.earned.extend(items)
        self._trim()

    def _trim(self) -> None:
        while len(self.earned) > self.config.max_earned:
            self.earned.popleft()
            self.dropped += 1


def _free(reason: str) -> Admission:
    return Admission(None, f"{reason}: the session runs at free priority")
