"""Who checks a node: the verifier the ledger's beacon assigns, or, without a ledger, a draw.

With a ledger (``docs/checks-protocol.md``), the check of node N's steps ``[0, k)`` waits for
the first beacon epoch that begins after the client received N's receipt for step k-1 (off the
critical path: the session goes on meanwhile), fetches that beacon, and seeds
:func:`~corolla.verify.assignment.assignment_seed` with it and N's chain digest after step k-1.
The candidates are the ledger's declarations made before that epoch for N's blocks and profile;
:func:`~corolla.verify.assignment.within_reach` ranks them and keeps the first
``MAX_SKIPS + 1`` that are neither N nor the client and that the ledger trusts (never slashed,
reputation at least its ``min_verifier_reputation``; looked up in rank order, cached briefly).
The client asks them in rank order and may pass over at most
:data:`~corolla.verify.assignment.MAX_SKIPS`: one that is not in the DHT with the same profile
over N's blocks, that the session avoids, or that fails to answer. Anyone can redo this draw
from the beacon and N's receipts, and the ledger counts only verdicts within it.

Without a ledger (or when the ledger cannot be reached), the client shuffles the reachable
verifiers with its own seeded randomness. Such checks protect the user's text; they credit
nothing, and a failed one cannot be judged.

Beacons are checked against the ledger key of the first beacon the client saw (a ledger that
changed its key mid-session is not believed).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from corolla.client.check_ledger import CheckLedger
from corolla.client.node_work import NodeWork
from corolla.client.swarm import Swarm
from corolla.errors import LedgerError, LedgerRefused, VerificationError
from corolla.node.protocol.records import ServerRecord
from corolla.verify.assignment import MAX_SKIPS, assignment_seed, rank, within_reach
from corolla.verify.beacon import Beacon, epoch_of, epoch_start, verify_beacon
from corolla.verify.tolerance import PROFILES

__all__ = ["Choice", "VerifierChoice", "profile_of_record"]

_TOO_EARLY = 425
_EARLY_RETRIES = 40
_EARLY_PAUSE_S = 0.25
_TRUST_TTL_S = 30.0
"""Seconds the ledger's word on a verifier's standing is reused."""


def profile_of_record(record: ServerRecord) -> str | None:
    """The compute profile a node announces (fp32, int8, nf4), or None if it has no tolerance."""
    return PROFILES.get((record.dtype, record.quant))


@dataclass(frozen=True)
class Choice:
    """The verifiers to ask for one check, in order, and the beacon that assigned them."""

    beacon: Beacon | None
    """None: the client's own draw (no ledger, or the ledger could not be reached)."""
    order: tuple[tuple[bytes, ServerRecord | None], ...]
    """(public key, its record in the DHT or None when it is not within reach)."""
    note: str = ""

    @property
    def epoch(self) -> int:
        return self.beacon.epoch if self.beacon is not None else 0


class VerifierChoice:
    """Draws the verifiers of a client's checks (shared by the client's sessions)."""

    def __init__(
        self,
        swarm: Swarm,
        model_digest: bytes,
        num_blocks: int,
        client_key: bytes,
        ledger: CheckLedger | None,
        seed: int | None = None,
    ) -> None:
        self.swarm = swarm
        self.model_digest = model_digest
        self.num_blocks = num_blocks
        self.client_key = client_key
        self.ledger = ledger
        self._random = random.Random(seed)
        self._beacons: dict[int, Beacon] = {}
        self._lock = asyncio.Lock()
        self._period: int | None = None
        self._ledger_key: bytes | None = None
        self._min_reputation: int | None = None
        self._trusted: dict[bytes, tuple[bool, float]] = {}

    async def choose(self, work: NodeWork, upto: int, avoid: frozenset[str]) -> Choice:
        """The verifiers of the check of ``work``'s steps ``[0, upto)``; ``avoid``: peers this
        session no longer uses (each still counts as a skip when the beacon ranks it)."""
        records = await self._reachable(work)
        usable = [record for record in records if record.peer_id not in avoid]
        if self.ledger is None:
            return self._own_draw(usable, "no ledger: the client's own draw (credits nothing)")
        try:
            beacon = await self._beacon_after(work.received[upto - 1])
            profile = profile_of_record(work.hop.record) or ""
            keys = await self.ledger.servers(
                self.model_digest, work.hop.start, work.hop.end, profile, beacon.epoch
            )
        except (LedgerError, VerificationError) as error:
            return self._own_draw(
                usable, f"the ledger could not assign a verifier ({error}): the client's own draw"
            )
        seed = assignment_seed(
            beacon,
            work.node_key,
            work.session_id,
            work.hop.start,
            work.hop.end,
            upto,
            work.claims[upto - 1].receipt.chain_digest,
        )
        excluded = (work.node_key, self.client_key)
        try:
            trust = await self._trust(seed, keys, excluded)
        except LedgerError as error:
            return self._own_draw(
                usable, f"the ledger could not say who is trusted ({error}): the client's own draw"
            )
        by_key = {record.public_key: record for record in records}
        reach = within_reach(seed, keys, excluded, trust.__getitem__)
        return Choice(beacon, tuple((key, by_key.get(key)) for key in reach))

    async def _trust(
        self, seed: bytes, keys: list[bytes], excluded: tuple[bytes, ...]
    ) -> dict[bytes, bool]:
        """Whether the ledger trusts each candidate (never slashed, enough reputation), looked
        up in rank order until ``MAX_SKIPS + 1`` trusted ones are found (the rest: untrusted)."""
        ledger = self._ledger()
        if self._min_reputation is None:
            rules = (await ledger.info()).get("rules")
            minimum = rules.get("min_verifier_reputation", 0) if isinstance(rules, dict) else 0
            self._min_reputation = minimum if isinstance(minimum, int) else 0
        trust = dict.fromkeys(keys, False)
        found = 0
        for key in rank(seed, keys):
            if found > MAX_SKIPS:
                break
            if key in excluded:
                continue
            cached = self._trusted.get(key)
            if cached is None or time.monotonic() - cached[1] > _TRUST_TTL_S:
                account = await ledger.account(key)
                standing = account is None or not account.slashed
                reputation = account.reputation if account is not None else 0
                cached = (standing and reputation >= self._min_reputation, time.monotonic())
                self._trusted[key] = cached
            trust[key] = cached[0]
            found += cached[0]
        return trust

    def distrust(self, key: bytes) -> None:
        """The ledger's referee convicted ``key``: the ledger no longer trusts it."""
        self._trusted[key] = (False, time.monotonic())

    async def _reachable(self, work: NodeWork) -> list[ServerRecord]:
        """Usable records in the DHT with N's profile that serve N's blocks (not N, not us)."""
        hop = work.hop
        wanted = (hop.record.dtype, hop.record.quant)
        records = await self.swarm.servers(self.model_digest, self.num_blocks)
        return [
            record
            for record in records
            if record.public_key not in (work.node_key, self.client_key)
            and self.swarm.usable(record)
            and (record.dtype, record.quant) == wanted
            and record.start <= hop.start
            and hop.end <= record.end
            and (self.swarm.config.subspans or (record.start, record.end) == (hop.start, hop.end))
        ]

    def _own_draw(self, records: list[ServerRecord], note: str) -> Choice:
        shuffled = sorted(records, key=lambda record: record.peer_id)
        self._random.shuffle(shuffled)
        return Choice(None, tuple((r.public_key, r) for r in shuffled[: MAX_SKIPS + 1]), note)

    async def _beacon_after(self, received: float) -> Beacon:
        """The beacon of the first epoch that begins after ``received`` (waits for it)."""
        period = await self._beacon_period()
        epoch = epoch_of(received, period) + 1
        found = self._beacons.get(epoch)
        if found is not None:
            return found
        delay = epoch_start(epoch, period) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        async with self._lock:
            found = self._beacons.get(epoch)
            if found is None:
                found = await self._fetch(epoch)
                self._beacons[epoch] = found
        return found

    async def _beacon_period(self) -> int:
        if self._period is None:
            async with self._lock:
                if self._period is None:
                    current = await self._ledger().beacon()
                    self._accept(current)
                    self._period = current.period
        return self._period

    async def _fetch(self, epoch: int) -> Beacon:
        """The beacon of ``epoch``; the ledger's clock may be a little behind ours."""
        for _ in range(_EARLY_RETRIES):
            try:
                beacon = await self._ledger().beacon(epoch)
            except LedgerRefused as error:
                if error.status_code != _TOO_EARLY:
                    raise
                await asyncio.sleep(_EARLY_PAUSE_S)
                continue
            if beacon.epoch != epoch or beacon.period != self._period:
                raise VerificationError(f"the ledger sent another beacon than epoch {epoch}'s")
            self._accept(beacon)
            return beacon
        raise LedgerError(f"the ledger did not reveal the beacon of epoch {epoch} in time")

    def _accept(self, beacon: Beacon) -> None:
        if self._ledger_key is None:
            self._ledger_key = beacon.ledger_key
        verify_beacon(beacon, self._ledger_key)

    def _ledger(self) -> CheckLedger:
        if self.ledger is None:
            raise LedgerError("no ledger")
        return self.ledger
