"""Which ledger's tickets a node honours: ``--ledger-key``, or else the key ``--ledger`` reports.

At startup a node with a ledger URL asks it for its key once (bounded). Without ``--ledger-key``
that key is trusted; with one, a different answer is a warning (tickets the ledger sells are not
honoured then, and redemptions fail). A ledger that does not answer is a warning too: the
settlement (:mod:`corolla.node.settlement`) asks again every period.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from corolla.node.balance_watch import check_ledger_url
from corolla.node.service import ServiceConfig
from corolla.node.settlement import fetch_ledger_key
from corolla.verify.identity import peer_name_of

__all__ = ["tickets_line", "trusted_service"]

_ASK_SECONDS = 10.0


async def trusted_service(service: ServiceConfig, ledger: str | None) -> ServiceConfig:
    """``service`` with the key of the ledger whose tickets it honours: its own
    ``tickets.ledger_key``, else the key the ledger at ``ledger`` reports (one bounded request;
    a warning line if it fails)."""
    if ledger is None:
        return service
    from corolla.ledger.api.client import AsyncLedgerClient, ClientConfig

    url = check_ledger_url(ledger)
    try:
        async with AsyncLedgerClient(url, config=ClientConfig(timeout_s=5.0, attempts=1)) as client:
            reported = await asyncio.wait_for(fetch_ledger_key(client), _ASK_SECONDS)
    except Exception as error:
        if service.tickets.ledger_key is None:
            print(
                f"warning: cannot get the ledger's key from {url} ({str(error)[:200]}); "
                "tickets are not honoured until it answers",
                flush=True,
            )
        return service
    configured = service.tickets.ledger_key
    if configured is None:
        return replace(service, tickets=replace(service.tickets, ledger_key=reported))
    if configured != reported:
        print(
            f"warning: --ledger-key is ledger {peer_name_of(configured)} but {url} is ledger "
            f"{peer_name_of(reported)}: tickets it sells are not honoured, redemptions will fail",
            flush=True,
        )
    return service


def tickets_line(key: bytes | None, ledger: str | None) -> str:
    """The line a node prints at startup about the tickets it honours (``key``: the ledger's)."""
    if key is None and ledger is None:
        return "tickets: not honoured (give --ledger URL or --ledger-key HEX to honour them)"
    if key is None:
        return f"tickets: not honoured until {ledger} says its key"
    line = f"tickets: honoured when signed by ledger {peer_name_of(key)}"
    if ledger is None:
        line += "; no --ledger, so ticketed work is not redeemed"
    return line
