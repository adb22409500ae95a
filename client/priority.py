"""Spending points for priority: tickets bought at the ledger, and routes through trusted peers.

`corolla generate --priority high` buys a ticket (or reuses an unexpired one with budget left),
attaches it to every node session and names it in every signed step request, so nodes put the
requests ahead of free ones and later redeem the receipts for the ticket's points. The route
then uses only peers whose ledger reputation reaches a threshold.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from corolla.errors import InvalidInput, LedgerError, RouteUnavailable
from corolla.ledger.api.client import LedgerClient
from corolla.node.protocol.records import ServerRecord
from corolla.verify.encoding import canonical
from corolla.verify.tickets import Ticket, verify_ticket

__all__ = [
    "DEFAULT_WALLET",
    "PriorityConfig",
    "TicketWallet",
    "encode_ticket",
    "trusted_keys",
]

DEFAULT_WALLET = Path.home() / ".corolla" / "tickets.json"


@dataclass(frozen=True)
class PriorityConfig:
    ledger_url: str
    budget: int = 10_000
    """Block-tokens a newly bought ticket holds."""
    ttl_s: int = 3600
    min_budget_left: int = 1_000
    """A saved ticket is reused only while at least this many block-tokens remain."""
    min_reputation: int = 1
    """Peers below this ledger reputation are not used on a priority route."""
    check_rate: float = 0.2
    wallet: Path = DEFAULT_WALLET

    def __post_init__(self) -> None:
        if self.budget < 1 or self.ttl_s < 1 or self.min_budget_left < 0:
            raise InvalidInput("a ticket needs a positive budget and lifetime")


def encode_ticket(ticket: Ticket) -> bytes:
    """The ticket as it travels in a session's open message."""
    return canonical(ticket.to_value())


@dataclass(frozen=True)
class WalletTicket:
    ticket: Ticket
    budget_left: int
    bought: bool
    cost: int


class TicketWallet:
    """Tickets this client bought, kept in a small JSON file (owner-only)."""

    def __init__(self, path: Path, ledger: LedgerClient) -> None:
        self.path = path
        self.ledger = ledger

    def _saved(self) -> list[Ticket]:
        if not self.path.is_file():
            return []
        try:
            return [Ticket.from_dict(item) for item in json.loads(self.path.read_text())]
        except (json.JSONDecodeError, TypeError, InvalidInput):
            return []  # a damaged wallet only costs a new ticket

    def _save(self, tickets: list[Ticket]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".tickets-")
        with os.fdopen(handle, "w") as file:
            json.dump([t.to_dict() for t in tickets], file)
        os.chmod(temp, 0o600)
        os.replace(temp, self.path)

    def ticket_for(self, config: PriorityConfig, client_key: bytes) -> WalletTicket:
        """An unexpired ticket of this client with budget left, else a newly bought one."""
        now_ms = int(time.time() * 1000)  # ticket expiries are unix milliseconds
        kept = []
        for ticket in self._saved():
            if ticket.client_key != client_key or ticket.expiry <= now_ms + 60_000:
                continue
            kept.append(ticket)
            try:
                _, spent = self.ledger.ticket(ticket.digest())
            except LedgerError:
                continue
            if ticket.budget - spent >= config.min_budget_left:
                self._save(kept)
                return WalletTicket(ticket, ticket.budget - spent, bought=False, cost=0)
        ticket = self.ledger.buy_ticket(config.budget, config.ttl_s)
        verify_ticket(ticket)
        self._save([*kept, ticket])
        return WalletTicket(ticket, ticket.budget, bought=True, cost=ticket.budget * ticket.price)


def trusted_keys(
    ledger: LedgerClient, records: list[ServerRecord], min_reputation: int
) -> frozenset[bytes]:
    """Public keys of the peers whose ledger account has at least `min_reputation`."""
    trusted = set()
    for key in {record.public_key for record in records}:
        account = ledger.account(key)
        if account is not None and not account.slashed and account.reputation >= min_reputation:
            trusted.add(key)
    if not trusted:
        raise RouteUnavailable(
            f"no peer has a ledger reputation of {min_reputation} or more: no trusted route "
            "(run without --priority high to use the free route)"
        )
    return frozenset(trusted)
