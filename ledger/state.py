"""What the rules read and write: the derived state of the log, behind one protocol.

The ledger keeps it in SQLite tables (:class:`corolla.ledger.store.SqlState`), the auditor in
memory (:class:`MemoryState`), and both are built only by appending entries
(:meth:`LedgerState.append`), so the state is always what replaying the log gives.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from corolla.errors import InvalidInput
from corolla.ledger.api.models import Account, Draft
from corolla.ledger.config import LedgerRules
from corolla.ledger.rules import Rect, Standing
from corolla.verify.tickets import Ticket

__all__ = [
    "Account",
    "LedgerState",
    "MemoryState",
    "TicketState",
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
        effect = effect_of(draft)
        key = draft.account
        account = self.accounts.get(key)
        if effect.register_name is not None:
            if account is not None:
                raise InvalidInput("account registered twice")
            self.accounts[key] = Account(key, effect.register_name, 0, 0)
        elif account is None and draft.kind != "genesis" and draft.kind != "fraud_evidence":
            raise InvalidInput("entry names an account that was never registered")
        elif account is not None and (effect.balance or effect.reputation or effect.slashed):
            balance = account.balance + effect.balance
            reputation = account.reputation + effect.reputation
            if balance < 0 or reputation < 0:
                raise InvalidInput("entry makes a balance or a reputation negative")
            slashed = account.slashed or effect.slashed
            self.accounts[key] = Account(key, account.name, balance, reputation, slashed)
        if effect.session is not None:
            client, session = effect.session
            self.coverage[(client, session)].extend(effect.pieces)
            self.earned.add((key, client, session))
        if effect.ticket is not None:
            self.tickets[effect.ticket.digest()] = TicketState(effect.ticket, 0)
        if effect.redeem is not None:
            ticket_digest, units = effect.redeem
            state = self.tickets.get(ticket_digest)
            if state is None:
                raise InvalidInput("entry redeems a ticket the ledger never sold")
            if state.spent + units > state.ticket.budget:
                raise InvalidInput("entry spends a ticket beyond its budget")
            self.tickets[ticket_digest] = TicketState(state.ticket, state.spent + units)
            self.redeemed.add(draft.ref)
        if effect.fee is not None:
            if effect.fee in self.fees:
                raise InvalidInput("entry pays a verifier twice for one recomputation")
            self.fees.add(effect.fee)
        if effect.evidence is not None:
            if effect.evidence in self.evidence_seqs:
                raise InvalidInput("entry logs the same fraud evidence twice")
            self.evidence_seqs[effect.evidence] = len(self.drafts)
        self.drafts.append(draft)
        return len(self.drafts) - 1
