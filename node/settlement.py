"""Getting paid for ticketed work: the node redeems its receipts at the ledger.

Every period (``--refresh-period``) and once more at shutdown (within two seconds, while the
node announces that it leaves), :class:`Settlement` takes the (request, receipt) pairs of the
steps the node served under tickets (:class:`corolla.node.ticket_book.TicketBook`) and redeems
them at the ledger, signed with the node's identity, in batches. It prints one line per round
that earned something::

    redeemed 1200 block-tokens from 1 ticket(s): +1200 points

The ledger refuses what is beyond a ticket's budget, already redeemed, expired, or not a
ticket's at all; refused pairs are dropped with one warning line per batch (the ledger's answer
is final). A ledger that is down or failing keeps the pairs for the next round, with one
warning line per outage; the book keeps at most ``max_earned`` of them (the oldest are dropped
beyond that, with a warning). Without a trusted ledger key the settlement also learns it from
the ledger's ``/v1/info``, so a node started while its ledger was down honours tickets once the
ledger answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from corolla.errors import LedgerError, LedgerRefused
from corolla.node.ticket_book import Earned, TicketBook, parse_ledger_key
from corolla.verify.identity import Identity, peer_name_of

if TYPE_CHECKING:
    from corolla.ledger.api.client import AsyncLedgerClient

__all__ = ["REDEEMED_PREFIX", "Redemption", "Settlement", "SettlementConfig", "fetch_ledger_key"]

REDEEMED_PREFIX = "redeemed "
"""Start of the line a node prints when the ledger paid it for ticketed work."""
logger = logging.getLogger("corolla.node")


@dataclass(frozen=True)
class SettlementConfig:
    """How a node talks to the ledger when it redeems."""

    timeout: float = 10.0
    """Seconds one request to the ledger may take."""
    batch_pairs: int = 200
    """Pairs per signed redemption request."""
    shutdown_timeout: float = 2.0
    """Seconds the last round at shutdown may take in all: a ledger that answers redeems a few
    thousand pairs in that time; one that does not costs a warning line, not a slow exit."""


@dataclass(frozen=True)
class Redemption:
    """What one round did."""

    units: int = 0
    """Block-tokens the ledger paid for."""
    points: int = 0
    tickets: int = 0
    """Distinct tickets that paid."""
    refused: int = 0
    """Pairs the ledger refused (dropped)."""
    kept: int = 0
    """Pairs kept for the next round (the ledger could not be reached)."""


async def fetch_ledger_key(ledger: AsyncLedgerClient) -> bytes:
    """The ledger's public key, as its ``/v1/info`` says; :class:`LedgerError` if it cannot."""
    info = await ledger.info()
    try:
        return parse_ledger_key(str(info["ledger_key"]))
    except (KeyError, TypeError) as error:
        raise LedgerError(f"the ledger's info has no usable ledger_key ({error!r})") from None


class Settlement:
    """Redeems the ticket book's pairs at the ledger at ``url``, as ``identity``."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        book: TicketBook,
        period: float,
        config: SettlementConfig | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.url = url
        self.identity = identity
        self.book = book
        self.period = period
        self.config = config or SettlementConfig()
        self.out = out
        self.down = False

    def client(self) -> AsyncLedgerClient:
        # Imported here: a node needs the ledger's client only when it is given a ledger.
        from corolla.ledger.api.client import AsyncLedgerClient, ClientConfig

        config = ClientConfig(
            timeout_s=self.config.timeout, attempts=2, batch_pairs=self.config.batch_pairs
        )
        return AsyncLedgerClient(self.url, self.identity, config)

    async def run(self, stop: asyncio.Event) -> None:
        """Redeem every period until ``stop`` is set, then once more (bounded)."""
        async with self.client() as ledger:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.period)
                if not stop.is_set():
                    await self.settle(ledger)

    async def final(self) -> Redemption:
        """The last round at shutdown: best effort, within ``shutdown_timeout`` seconds."""
        if not self.book.earned:
            return Redemption()
        async with self.client() as ledger:
            try:
                async with asyncio.timeout(self.config.shutdown_timeout):
                    return await self.settle(ledger)
            except TimeoutError:
                left = len(self.book.earned)
                self._print(f"warning: {left} ticketed step(s) left unredeemed at shutdown")
                return Redemption(kept=left)

    async def settle(self, ledger: AsyncLedgerClient) -> Redemption:
        """One round: redeem everything waiting, batch by batch; print what it earned."""
        await self._learn_key(ledger)
        if self.book.dropped:
            dropped, self.book.dropped = self.book.dropped, 0
            self._print(
                f"warning: {dropped} ticketed step(s) dropped unredeemed: more than "
                f"{self.book.config.max_earned} were waiting for the ledger"
            )
        units = points = refused = 0
        tickets: set[bytes] = set()
        while self.book.earned:
            batch = self.book.take(self.config.batch_pairs)
            try:
                results = await ledger.redeem([(item.request, item.receipt) for item in batch])
            except LedgerRefused as error:
                refused += len(batch)
                self._print(
                    f"warning: the ledger refused {len(batch)} ticketed step(s), dropped: "
                    f"{str(error)[:300]}"
                )
                continue
            except Exception as error:  # down, slow or failing: keep everything for later
                self.book.put_back(batch)
                self._outage(error)
                return Redemption(units, points, len(tickets), refused, len(self.book.earned))
            paid, lost, why = _outcome(batch, results)
            if self.down:
                self.down = False
                self._print(f"ledger {self.url} reachable again: redeeming")
            for item, redeemed in paid:
                units += redeemed
                points += redeemed * item.price
                tickets.add(item.request.ticket_digest or b"")
            if lost:
                refused += lost
                self._print(
                    f"warning: the ledger refused {lost} of {len(batch)} ticketed step(s), "
                    f"dropped: {why}"
                )
        if units:
            self._print(
                f"{REDEEMED_PREFIX}{units} block-tokens from {len(tickets)} ticket(s): "
                f"+{points} points"
            )
        return Redemption(units, points, len(tickets), refused, 0)

    async def _learn_key(self, ledger: AsyncLedgerClient) -> None:
        """Without a trusted key, ask the ledger for it (tickets are honoured from then on)."""
        if self.book.ledger_key is not None:
            return
        try:
            key = await fetch_ledger_key(ledger)
        except Exception as error:
            logger.debug("cannot fetch the ledger's key: %r", error)
            return
        self.book.trust(key)
        self._print(f"tickets: honoured when signed by ledger {peer_name_of(key)}")

    def _outage(self, error: Exception) -> None:
        if self.down:
            return
        self.down = True
        reason = "no answer in time" if isinstance(error, TimeoutError) else str(error)
        self._print(
            f"warning: ledger {self.url} unreachable ({reason[:200]}); "
            f"{len(self.book.earned)} ticketed step(s) kept for the next round"
        )

    def _print(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)


def _outcome(
    batch: list[Earned], results: list[dict[str, Any]]
) -> tuple[list[tuple[Earned, int]], int, str]:
    """The pairs the ledger paid (with the block-tokens it paid for), how many it refused, and
    its first reasons. (``batch`` fits one request, so ``results`` holds one answer.)"""
    answers: dict[int, dict[str, Any]] = {}
    for result in results[:1]:
        pairs = result.get("pairs") if isinstance(result, dict) else None
        for pair in pairs if isinstance(pairs, list) else []:
            if isinstance(pair, dict) and isinstance(pair.get("pair"), int):
                answers[pair["pair"]] = pair
    paid: list[tuple[Earned, int]] = []
    reasons: list[str] = []
    for index, item in enumerate(batch):
        answer = answers.get(index, {})
        redeemed = answer.get("redeemed_units")
        if isinstance(redeemed, int) and 0 < redeemed <= item.units:
            paid.append((item, redeemed))
        elif len(reasons) < 3:
            reasons.append(str(answer.get("refused") or "not paid")[:120])
    lost = len(batch) - len(paid)
    return paid, lost, "; ".join(dict.fromkeys(reasons))
