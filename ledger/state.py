"""What the rules read and write: the derived state of the log, behind one protocol.

The ledger keeps it in SQLite tables (:class:`corolla.ledger.store.SqlState`), the auditor in
memory (:class:`corolla.ledger.memory.MemoryState`), and both are built only by appending entries
(:meth:`LedgerState.append`), so the state is always what replaying the log gives. Both read
an entry's change from one definition (:func:`effect_of`) and check it against one list of
invariants (:data:`INVARIANTS`, through :func:`admit`) before they write anything: an account
registered once, no entry for an unregistered account, no negative balance or reputation, no
work credited twice, a ticket sold once and never overspent, a request redeemed once, a
verifier paid once per position it checked, fraud evidence and disputes logged once, a serving
declaration made once while in force and withdrawn only while in force, calibrations published
by the ledger only.

Checks v2 add derived state the assignment reads: the **serving declarations** (who declared
which span of which model under which profile, from when, until when), the **published
calibrations** (the threshold the ledger holds a verdict to) and the **paid positions** of
each verifier (fees grow with the work, never twice for one position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any, Protocol

from corolla.errors import InvalidInput, LedgerRefused
from corolla.ledger.api.checks import Serving, calibration_from_wire
from corolla.ledger.api.models import Account, Draft
from corolla.ledger.config import LedgerRules
from corolla.ledger.rules import Rect, Standing, overlap
from corolla.verify.tickets import Ticket

if TYPE_CHECKING:
    from corolla.verify.tolerance import Calibration

__all__ = [
    "INVARIANTS",
    "NEVER",
    "Account",
    "Effect",
    "Invariant",
    "LedgerState",
    "TicketState",
    "admit",
    "effect_of",
    "ensure_account",
    "standing_of",
]


NEVER = 2**62
"""The ``until`` of a serving declaration in force (ms)."""


@dataclass(frozen=True, slots=True)
class TicketState:
    """A ticket the ledger sold, and how many of its block-tokens were redeemed."""

    ticket: Ticket
    spent: int


class LedgerState(Protocol):
    """Read access for the rules, and :meth:`append` to record a decision."""

    ledger_key: bytes
    origin: str
    rules: LedgerRules

    def account(self, key: bytes) -> Account | None:
        """The account, or None if it was never registered."""
        ...

    def covered(self, client: bytes, session: bytes, rect: Rect) -> list[Rect]:
        """Credited pieces of the client session that overlap ``rect``."""
        ...

    def has_earned(self, node: bytes, client: bytes, session: bytes) -> bool:
        """Whether ``node`` was already credited in this client session."""
        ...

    def ticket(self, digest: bytes) -> TicketState | None:
        """The ticket with this digest, if the ledger sold it."""
        ...

    def is_redeemed(self, request_digest: bytes) -> bool:
        """Whether the receipt of this client request was already redeemed."""
        ...

    def paid(self, verifier: bytes, client: bytes, session: bytes, rect: Rect) -> list[Rect]:
        """Pieces of the client session that ``verifier`` was paid for checking, overlapping
        ``rect``."""
        ...

    def evidence(self, digest: bytes) -> int | None:
        """The sequence number of the fraud-evidence or dispute entry with this digest."""
        ...

    def serves(self, node: bytes, serving: Serving) -> bool:
        """Whether ``node``'s declaration of exactly ``serving`` is in force."""
        ...

    def servers(self, serving: Serving, before: int) -> list[bytes]:
        """Keys of the nodes whose declarations cover ``serving``'s blocks of its model under
        its profile, logged before ``before`` (ms) and not withdrawn before then."""
        ...

    def calibration(self, model: bytes, profile: str, before: int) -> Calibration | None:
        """The latest calibration of the model and profile published before ``before`` (ms)."""
        ...

    def sign_ticket(self, unsigned: Ticket) -> Ticket:
        """The ledger's signature on a ticket being sold."""
        ...

    def append(self, draft: Draft) -> int:
        """Append an entry, apply its effect, return its sequence number."""
        ...


@dataclass(frozen=True, slots=True)
class Effect:
    """How one entry changes the derived state (the one definition both stores follow)."""

    balance: int = 0
    reputation: int = 0
    register_name: str | None = None
    pieces: tuple[Rect, ...] = ()
    session: tuple[bytes, bytes] | None = None
    ticket: Ticket | None = None
    redeem: tuple[bytes, int] | None = None
    slashed: bool = False
    paid: tuple[bytes, bytes, tuple[Rect, ...]] | None = None
    """A verifier's fee: (client, session, the pieces it pays for)."""
    evidence: bytes | None = None
    declared: tuple[Serving, int] | None = None
    """A serving declaration and its time (ms)."""
    withdrawn: tuple[Serving, int] | None = None
    calibration: tuple[Calibration, int] | None = None
    """A published calibration and its time (ms)."""


def ensure_account(state: LedgerState, key: bytes) -> list[int]:
    """Open an account for ``key`` if it has none (an unnamed one); the entries appended."""
    if state.account(key) is not None:
        return []
    return [state.append(Draft("account_registered", key, 0, b"", {"name": ""}))]


def standing_of(state: LedgerState) -> Standing:
    """``key -> (slashed, reputation)`` read from ``state`` (``(False, 0)`` for a new key)."""

    def standing(key: bytes) -> tuple[bool, int]:
        account = state.account(key)
        return (False, 0) if account is None else (account.slashed, account.reputation)

    return standing


def effect_of(draft: Draft) -> Effect:
    """Read an entry's effect from its kind and payload; raises :class:`InvalidInput` if the
    payload does not have the shape its kind requires."""
    payload = draft.payload
    try:
        if draft.kind == "account_registered":
            return Effect(register_name=payload["name"])
        if draft.kind == "work_credited":
            pieces = tuple(tuple(piece) for piece in payload["pieces"])
            return Effect(
                balance=draft.amount,
                pieces=pieces,  # type: ignore[arg-type]
                session=(payload["client"], payload["session"]),
            )
        if draft.kind == "reputation_changed":
            return Effect(reputation=draft.amount)
        if draft.kind == "ticket_bought":
            return Effect(balance=draft.amount, ticket=Ticket.from_value(payload["ticket"]))
        if draft.kind == "ticket_redeemed":
            return Effect(balance=draft.amount, redeem=(payload["ticket"], payload["units"]))
        if draft.kind == "verifier_fee":
            pieces = tuple(tuple(piece) for piece in payload["pieces"])
            paid = (payload["client"], payload["session"], pieces)
            return Effect(balance=draft.amount, paid=paid)  # type: ignore[arg-type]
        if draft.kind == "slash":
            return Effect(balance=draft.amount, slashed=True)
        if draft.kind in ("fraud_evidence", "dispute"):
            return Effect(evidence=draft.ref)
        if draft.kind == "serving_declared":
            return Effect(declared=(_serving(payload), payload["time"]))
        if draft.kind == "serving_withdrawn":
            return Effect(withdrawn=(_serving(payload), payload["time"]))
        if draft.kind == "calibration_published":
            calibration = calibration_from_wire(payload["calibration"])
            return Effect(calibration=(calibration, payload["time"]))
        if draft.kind == "genesis":
            return Effect()
    except (KeyError, TypeError) as error:
        raise InvalidInput(f"{draft.kind} entry has a malformed payload: {error}") from None
    raise InvalidInput(f"unknown entry kind {draft.kind!r}")


def _serving(payload: Any) -> Serving:
    return Serving(payload["model"], payload["start"], payload["end"], payload["profile"])


_WITHOUT_ACCOUNT = frozenset({"genesis", "fraud_evidence", "dispute", "calibration_published"})
"""Entry kinds that may name a key with no account (the ledger's own, an unregistered accused)."""


@dataclass(frozen=True, slots=True)
class Invariant:
    """What no appended entry may do, judged on the state before it (and the entry's account,
    read once): the ledger refuses the entry and the auditor the log."""

    refusal: str
    broken: Callable[[LedgerState, Draft, Effect, Account | None], bool]


def _registered_twice(_: LedgerState, __: Draft, effect: Effect, account: Account | None) -> bool:
    return effect.register_name is not None and account is not None


def _unregistered(_: LedgerState, draft: Draft, effect: Effect, account: Account | None) -> bool:
    return account is None and effect.register_name is None and draft.kind not in _WITHOUT_ACCOUNT


def _negative(_: LedgerState, __: Draft, effect: Effect, account: Account | None) -> bool:
    return account is not None and (
        account.balance + effect.balance < 0 or account.reputation + effect.reputation < 0
    )


def _credited_twice(state: LedgerState, _: Draft, effect: Effect, __: Account | None) -> bool:
    if effect.session is None:
        return False
    client, session = effect.session
    pieces = effect.pieces
    return any(overlap(a, b) for a, b in combinations(pieces, 2)) or any(
        state.covered(client, session, piece) for piece in pieces
    )


def _ticket_sold_twice(state: LedgerState, _: Draft, effect: Effect, __: Account | None) -> bool:
    return effect.ticket is not None and state.ticket(effect.ticket.digest()) is not None


def _ticket_unsold(state: LedgerState, _: Draft, effect: Effect, __: Account | None) -> bool:
    return effect.redeem is not None and state.ticket(effect.redeem[0]) is None


def _overspent(state: LedgerState, _: Draft, effect: Effect, __: Account | None) -> bool:
    if effect.redeem is None:
        return False
    ticket_digest, units = effect.redeem
    sold = state.ticket(ticket_digest)
    return sold is not None and sold.spent + units > sold.ticket.budget


def _redeemed_twice(state: LedgerState, draft: Draft, effect: Effect, _: Account | None) -> bool:
    return effect.redeem is not None and state.is_redeemed(draft.ref)


def _paid_twice(state: LedgerState, draft: Draft, effect: Effect, _: Account | None) -> bool:
    if effect.paid is None:
        return False
    client, session, pieces = effect.paid
    return any(overlap(a, b) for a, b in combinations(pieces, 2)) or any(
        state.paid(draft.account, client, session, piece) for piece in pieces
    )


def _declared_twice(state: LedgerState, draft: Draft, effect: Effect, _: Account | None) -> bool:
    return effect.declared is not None and state.serves(draft.account, effect.declared[0])


def _withdrawn_unserved(
    state: LedgerState, draft: Draft, effect: Effect, _: Account | None
) -> bool:
    return effect.withdrawn is not None and not state.serves(draft.account, effect.withdrawn[0])


def _published_by_other(
    state: LedgerState, draft: Draft, effect: Effect, _: Account | None
) -> bool:
    return effect.calibration is not None and draft.account != state.ledger_key


def _evidence_twice(state: LedgerState, _: Draft, effect: Effect, __: Account | None) -> bool:
    return effect.evidence is not None and state.evidence(effect.evidence) is not None


INVARIANTS: tuple[Invariant, ...] = (
    Invariant("the account is already registered", _registered_twice),
    Invariant("it names an account that was never registered", _unregistered),
    Invariant("it would make a balance or a reputation negative", _negative),
    Invariant("it credits work already credited", _credited_twice),
    Invariant("it sells a ticket that was already sold", _ticket_sold_twice),
    Invariant("it redeems a ticket the ledger never sold", _ticket_unsold),
    Invariant("it spends a ticket beyond its budget", _overspent),
    Invariant("it redeems a request that was already redeemed", _redeemed_twice),
    Invariant("it pays a verifier twice for checking the same positions", _paid_twice),
    Invariant("it logs the same fraud evidence or dispute twice", _evidence_twice),
    Invariant("it declares serving what the node already declares", _declared_twice),
    Invariant("it withdraws a serving declaration that is not in force", _withdrawn_unserved),
    Invariant("it publishes a calibration that is not the ledger's", _published_by_other),
)
"""The one list of what an entry may not do, read by both states before they apply it."""


def admit(state: LedgerState, draft: Draft) -> Effect:
    """The effect of ``draft`` on ``state``, once it breaks no :data:`INVARIANTS`; raises
    :class:`~corolla.errors.LedgerRefused` (409) naming the first one it breaks (or
    :class:`InvalidInput` for a malformed payload). Nothing is written either way."""
    effect = effect_of(draft)
    account = state.account(draft.account)
    for invariant in INVARIANTS:
        if invariant.broken(state, draft, effect, account):
            raise LedgerRefused(f"refusing a {draft.kind} entry: {invariant.refusal}", 409)
    return effect
