"""The derived state in memory: what an auditor rebuilds by replaying the log (the ledger keeps
the same state in SQLite, :class:`corolla.ledger.store.SqlState`). Every entry goes through
:func:`corolla.ledger.state.admit` first, so both refuse the same entries."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corolla.errors import InvalidInput
from corolla.ledger.api.checks import Serving
from corolla.ledger.api.models import Account, Draft
from corolla.ledger.config import LedgerRules
from corolla.ledger.rules import Rect, overlap
from corolla.ledger.state import NEVER, TicketState, admit
from corolla.verify.tickets import Ticket

if TYPE_CHECKING:
    from corolla.verify.tolerance import Calibration

__all__ = ["MemoryState"]


class MemoryState:
    """The derived state in dictionaries: what an auditor rebuilds from the log."""

    def __init__(self, ledger_key: bytes, rules: LedgerRules, origin: str) -> None:
        self.ledger_key = ledger_key
        self.origin = origin
        self.rules = rules
        self.accounts: dict[bytes, Account] = {}
        self.coverage: dict[tuple[bytes, bytes], list[Rect]] = defaultdict(list)
        self.earned: set[tuple[bytes, bytes, bytes]] = set()
        self.tickets: dict[bytes, TicketState] = {}
        self.redeemed: set[bytes] = set()
        self.checked: dict[tuple[bytes, bytes, bytes], list[Rect]] = defaultdict(list)
        self.evidence_seqs: dict[bytes, int] = {}
        self.declarations: dict[tuple[bytes, str], list[_Declared]] = defaultdict(list)
        self.calibrations: dict[tuple[bytes, str], list[tuple[int, Calibration]]] = defaultdict(
            list
        )
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

    def paid(self, verifier: bytes, client: bytes, session: bytes, rect: Rect) -> list[Rect]:
        return [
            piece
            for piece in self.checked.get((verifier, client, session), ())
            if overlap(piece, rect)
        ]

    def evidence(self, digest: bytes) -> int | None:
        return self.evidence_seqs.get(digest)

    def serves(self, node: bytes, serving: Serving) -> bool:
        return any(
            d.node == node and d.serving == serving and d.until == NEVER
            for d in self.declarations.get((serving.model_digest, serving.profile), ())
        )

    def servers(self, serving: Serving, before: int) -> list[bytes]:
        found = {
            d.node
            for d in self.declarations.get((serving.model_digest, serving.profile), ())
            if d.serving.covers(serving.start, serving.end) and d.since < before <= d.until
        }
        return sorted(found)

    def calibration(self, model: bytes, profile: str, before: int) -> Calibration | None:
        published = [c for time, c in self.calibrations.get((model, profile), ()) if time < before]
        return published[-1] if published else None

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
        if effect.paid is not None:
            client, session, pieces = effect.paid
            self.checked[(key, client, session)].extend(pieces)
        if effect.evidence is not None:
            self.evidence_seqs[effect.evidence] = len(self.drafts)
        if effect.declared is not None:
            serving, since = effect.declared
            found = self.declarations[(serving.model_digest, serving.profile)]
            found.append(_Declared(key, serving, since))
        if effect.withdrawn is not None:
            serving, until = effect.withdrawn
            for declared in self.declarations[(serving.model_digest, serving.profile)]:
                if declared.node == key and declared.serving == serving and declared.until == NEVER:
                    declared.until = until
        if effect.calibration is not None:
            calibration, time = effect.calibration
            self.calibrations[(calibration.model_digest, calibration.profile)].append(
                (time, calibration)
            )
        self.drafts.append(draft)
        return len(self.drafts) - 1


@dataclass(slots=True)
class _Declared:
    """A serving declaration in the auditor's memory: in force from ``since`` until ``until``."""

    node: bytes
    serving: Serving
    since: int
    until: int = NEVER
