"""The points a node has earned, watched live at the ledger (``corolla node run --ledger URL``).

Every period the watcher asks the ledger for the balance of the node's public key, with a bounded
timeout, and prints one line when it changes (``points: 120 (+40)``; the first answer prints
``points: N``). A ledger that is down or refuses costs one warning line per outage, never the
node: the watcher goes on asking, and says so when the ledger answers again. Lines go to stdout
with a flush, one per event, so whoever reads a node's output line by line (the launcher waits
for ``listening on``) is not disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from corolla.errors import InvalidInput

if TYPE_CHECKING:
    from corolla.ledger.api.client import AsyncLedgerClient

__all__ = ["POINTS_PREFIX", "PointsWatcher", "check_ledger_url"]

POINTS_PREFIX = "points: "
"""Start of the line a node prints when its balance at the ledger changes."""
logger = logging.getLogger("corolla.node")


def check_ledger_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL; :class:`InvalidInput` if not."""
    if (
        not url.startswith(("http://", "https://"))
        or len(url) > 2000
        or any(c.isspace() for c in url)
    ):
        raise InvalidInput(f"--ledger must be an http:// or https:// URL, not {url[:80]!r}")
    return url.rstrip("/")


@dataclass
class PointsWatcher:
    """Polls ``balance(key)`` at ``url`` every ``period`` seconds and prints what changed."""

    url: str
    key: bytes
    period: float
    timeout: float = 5.0
    out: TextIO | None = None
    """Where lines go (stdout when None)."""
    balance: int | None = None
    """The last balance the ledger reported (None before its first answer)."""
    down: bool = False

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        try:
            # Imported here: a node needs the ledger's client only when it is given a ledger.
            from corolla.ledger.api.client import AsyncLedgerClient, ClientConfig

            config = ClientConfig(timeout_s=self.timeout, attempts=1)
            ledger = AsyncLedgerClient(self.url, config=config)
        except Exception as error:
            self._print(f"warning: cannot use ledger {self.url} ({error}); points not shown")
            return
        try:
            while not stop.is_set():
                await self.poll(ledger)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.period)
        finally:
            with contextlib.suppress(Exception):
                await ledger.aclose()

    async def poll(self, ledger: AsyncLedgerClient) -> int | None:
        """Ask once; print a line if the balance changed or the ledger went down or came back."""
        try:
            balance = await asyncio.wait_for(ledger.balance(self.key), 2 * self.timeout)
        except Exception as error:  # any failure of the ledger is its problem, not the node's
            if not self.down:
                self.down = True
                reason = "no answer in time" if isinstance(error, TimeoutError) else str(error)
                self._print(
                    f"warning: ledger {self.url} unreachable ({reason[:200]}); "
                    f"points not shown, retrying every {self.period:g} s"
                )
            logger.debug("ledger poll failed: %r", error)
            return None
        back, self.down = self.down, False
        if balance == self.balance and not back:
            return balance
        line = f"{POINTS_PREFIX}{balance}"
        if self.balance is not None and balance != self.balance:
            line += f" ({balance - self.balance:+d})"
        if back:
            line += " (ledger reachable again)"
        self._print(line)
        self.balance = balance
        return balance

    def _print(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)
