"""A node's declaration to the ledger of what it serves: what makes it a candidate verifier.

Checks are assigned among the nodes the ledger knows to serve a span with a compute profile
(:mod:`corolla.verify.assignment`). A node started with ``--ledger`` declares its span and
profile once it is online (retrying every refresh period while the ledger cannot be reached:
a declaration already in force counts as done), and withdraws it when it stops, within the
shutdown's bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from corolla.errors import CorollaError, LedgerRefused
from corolla.ledger.api.client import AsyncLedgerClient, ClientConfig
from corolla.verify.identity import Identity

__all__ = ["ServingDeclaration"]

_log = logging.getLogger("corolla.node.declaration")
_ALREADY = 409


class ServingDeclaration:
    """Declares blocks ``[start, end)`` of ``model_digest`` under ``profile`` at ``url``."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        model_digest: bytes,
        span: tuple[int, int],
        profile: str,
        period: float,
    ) -> None:
        self.url = url
        self.identity = identity
        self.model_digest = model_digest
        self.start, self.end = span
        self.profile = profile
        self.period = period
        self.declared = asyncio.Event()

    def _client(self) -> AsyncLedgerClient:
        return AsyncLedgerClient(self.url, self.identity, ClientConfig(timeout_s=5.0, attempts=1))

    async def run(self, stop: asyncio.Event) -> None:
        """Declare, retrying every period until it is done or ``stop`` is set."""
        while not stop.is_set() and not self.declared.is_set():
            try:
                async with self._client() as ledger:
                    await ledger.declare_serving(
                        self.model_digest, self.start, self.end, self.profile
                    )
                self.declared.set()
                _log.info("declared blocks %d:%d (%s) at the ledger", self.start, self.end,
                          self.profile)  # fmt: skip
            except LedgerRefused as error:
                if error.status_code == _ALREADY:
                    self.declared.set()
                    return
                _log.warning("the ledger refused the serving declaration: %s", error)
            except CorollaError as error:
                _log.warning("cannot declare at the ledger yet: %s", error)
            if not self.declared.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.period)

    async def withdraw(self) -> None:
        """Withdraw the declaration if it was made (errors are logged, never raised)."""
        if not self.declared.is_set():
            return
        try:
            async with self._client() as ledger:
                await ledger.withdraw_serving(self.model_digest, self.start, self.end, self.profile)
        except CorollaError as error:
            _log.warning("could not withdraw the serving declaration: %s", error)
