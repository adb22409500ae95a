"""What the rules read and write: the derived state of the log, behind one protocol.

The ledger keeps it in SQLite tables (:class:`corolla.ledger.store.SqlState`), the auditor in
memory (:class:`MemoryState`), and both are built only by appending entries
(:meth:`LedgerState.append`), so the state is always what replaying the log gives. Both read
an entry's change from one definition (:func:`effect_of`) and check it against one list of
invariants (:data:`INVARIANTS`, through :func:`admit`) before they write anything: an account
registered once, no entry for an unregistered account, no negative balance or reputation, no
work credited twice, a ticket sold once and never overspent, a request redeemed once, a fee
paid once per recomputation, fraud evidence logged once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Protocol

from corolla.errors import InvalidInput, LedgerRefused
from corolla.ledger.api.models import Account, Draft
from corolla.ledger.config import LedgerRules
from corolla.ledger.rules import Rect, Standing
from corolla.verify.tickets import Ticket

__all__ = [
    "INVARIANTS",
    "Account",
    "Effect",
    "Invariant",
    "LedgerState",
    "MemoryState",
    "TicketState",
    "admit",
    "effect_of",
    "ensure_account",
    "standing_of",
]


@dataclass(frozen=True, slots=True)
class TicketState:
    """A ticket the ledger sold, and how many of its block-tokens were redeemed."""

    ticket: Ticket
    spent: int


class LedgerState(Protocol):
    """Read access for the rules, and :meth:`append` to record a decision."""

    ledger_key: bytes
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

    def fee_paid(self, recomputation: bytes) -> bool:
        """Whether a verifier was already paid for the recomputation with this receipt digest."""
        ...

    def evidence(self, digest: bytes) -> int | None:
        """The sequence number of the fraud-evidence entry with this digest, if logged."""
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
    fee: bytes | None = None
    evidence: bytes | None = None


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
            return Effect(balance=draft.amount, fee=draft.ref)
        if draft.kind == "slash":
            return Effect(balance=draft.amount, slashed=True)
        if draft.kind == "fraud_evidence":
            return Effect(evidence=draft.ref)
        if draft.kind == "genesis":
            return Effect()
    except (KeyError, TypeError) as error:
        raise InvalidInput(f"{draft.kind} entry has a malformed payload: {error}") from None
    raise InvalidInput(f"unknown entry kind {draft.kind!r}")


_WITHOUT_ACCOUNT = frozenset({"genesis", "fraud_evidence"})
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
    return any(_overlap(a, b) for a, b in combinations(pieces, 2)) or any(
        state.covered(client, session, piece) for piece in pieces
    )


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


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


def _fee_twice(state: LedgerState, _: Draft, effect: Effect, __: Account | None) -> bool:
    return effect.fee is not None and state.fee_paid(effect.fee)


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
    Invariant("it pays a verifier twice for one recomputation", _fee_twice),
    Invariant("it logs the same fraud evidence twice", _evidence_twice),
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


class MemoryState:
    """The derived state in dictionaries: what an auditor rebuilds from the log."""

    def __init__(self, ledger_key: bytes, rules: LedgerRules) -> None:
        self.ledger_key = ledger_key
        self.rules = rules
        self.accounts: dict[bytes, Account] = {}
        self.coverage: dict[tuple[bytes, bytes], list[Rect]] = defaultdict(list)
        self.earned: set[tuple[bytes, bytes, bytes]] = set()
        self.tickets: dict[bytes, TicketState] = {}
        self.redeemed: set[bytes] = set()
        self.fees: set[bytes] = set()
        self.evidence_seqs: dict[bytes, int] = {}
        self.drafts: list[Draft] = []
        self.ticket_signatures: dict[bytes, bytes] = {}

    def account(self, key: bytes) -> Account | None:
        return self.accounts.get(key)

    def covered(self, client: bytes, session: bytes, rect: Rect) -> list[Rect]:
        b0, b1, t0, t1 = rect
        return [
            piece
            for piece in self.coverage.get((client, session), ())
            if piece[2] < t1 and piece[3] > t0 and piece[0] < b1 and piece[1] > b0
        ]

    def has_earned(self, node: bytes, client: bytes, session: bytes) -> bool:
        return (node, client, session) in self.earned

    def ticket(self, digest: bytes) -> TicketState | None:
        return self.tickets.get(digest)

    def is_redeemed(self, request_digest: bytes) -> bool:
        return request_digest in self.redeemed

    def fee_paid(self, recomputation: bytes) -> bool:
        return recomputation in self.fees

    def evidence(self, digest: bytes) -> int | None:
        return self.evidence_seqs.get(digest)

    def sign_ticket(self, unsigned: Ticket) -> Ticket:
        """The auditor cannot sign: it takes the signature the log recorded for this serial
        (set in :attr:`ticket_signatures`); the ticket's check happens in the replay."""
        signature = self.ticket_signatures.get(unsigned.serial)
        if signature is None:
            raise InvalidInput("the log holds no ticket for this purchase")
        return Ticket(**{**unsigned.to_value(), "signature": signature})

    def append(self, draft: Draft) -> int:
        effect = admit(self, draft)
        key = draft.account
        account = self.accounts.get(key)
        if effect.register_name is not None:
            self.accounts[key] = Account(key, effect.register_name, 0, 0)
        elif account is not None and (effect.balance or effect.reputation or effect.slashed):
            self.accounts[key] = Account(
                key,
                account.name,
                account.balance + effect.balance,
                account.reputation + effect.reputation,
                account.slashed or effect.slashed,
            )
        if effect.session is not None:
            client, session = effect.session
            self.coverage[(client, session)].extend(effect.pieces)
            self.earned.add((key, client, session))
        if effect.ticket is not None:
            self.tickets[effect.ticket.digest()] = TicketState(effect.ticket, 0)
        if effect.redeem is not None:
            ticket_digest, units = effect.redeem
            sold = self.tickets[ticket_digest]
            self.tickets[ticket_digest] = TicketState(sold.ticket, sold.spent + units)
            self.redeemed.add(draft.ref)
        if effect.fee is not None:
            self.fees.add(effect.fee)
        if effect.evidence is not None:
            self.evidence_seqs[effect.evidence] = len(self.drafts)
        self.drafts.append(draft)
        return len(self.drafts) - 1
