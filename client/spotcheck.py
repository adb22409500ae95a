"""Spot-checks (checks v2, ``docs/checks-protocol.md``): an assigned verifier compares, signs.

After a step on a node, the client checks that node with probability ``rate`` (and every node at
least once, at the end of the session). The check of node N's steps ``[0, k)`` goes to the
verifier the ledger's beacon assigns (:mod:`corolla.client.verifier_choice`), which recomputes
the steps it has not covered yet on its check session (:mod:`corolla.client.check_streams`),
compares them with N's signed outputs under the model's threshold, and signs its verdict.

The client does not compare and never settles anything by a majority: a passed verdict verifies
N's steps ``[0, k)``; a failed one (or a failed head rule, :mod:`corolla.client.head_rule`)
goes to the ledger's referee as a dispute (:mod:`corolla.client.disputes`), and the session acts
only on its judgment. A verifier that fails to answer is passed over (a skip), never taken for
a liar; with no verifier within reach the check is ``unchecked`` and says why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from corolla.client.check_ledger import CheckLedger, CheckRules
from corolla.client.check_streams import CheckStreams
from corolla.client.node_work import NodeWork
from corolla.client.swarm import Swarm
from corolla.client.verifier_choice import VerifierChoice, profile_of_record
from corolla.errors import CorollaError, InvalidInput, LedgerError
from corolla.node.model.manifest import Manifest
from corolla.node.protocol.records import ServerRecord
from corolla.verify.beacon import Beacon
from corolla.verify.disputes import CheckRecord
from corolla.verify.identity import peer_name_of
from corolla.verify.verdicts import parse_score

__all__ = ["CheckOutcome", "SpotCheckConfig", "SpotChecker"]


@dataclass(frozen=True)
class SpotCheckConfig:
    rate: float = 0.05
    """Probability that a step triggers a check of the node that computed it."""
    at_least_once: bool = True
    """Check every node of a session at least once, at its end."""
    timeout: float = 30.0
    """Seconds a verifier has to answer one check step."""
    seed: int | None = None
    """Seeds which steps are checked (and the verifier draw without a ledger)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise InvalidInput("the spot-check rate must be in [0, 1]")
        if not self.timeout > 0:
            raise InvalidInput("the spot-check timeout must be positive")


@dataclass(frozen=True, eq=False)
class CheckOutcome:
    """One check of a node's steps ``[0, steps)``: who checked, what they signed."""

    work: NodeWork
    steps: int
    verdict: str
    """``passed`` | ``failed`` (the verifier signed a failed verdict: a dispute follows) |
    ``unchecked`` (no verifier within reach answered; ``note`` says why)."""
    verifier: ServerRecord | None
    records: tuple[CheckRecord, ...]
    """The verdicts of this check (one per check step), each with its recomputation."""
    beacon: Beacon | None
    """The beacon that assigned the verifier; None for the client's own draw."""
    skipped: tuple[str, ...] = ()
    """Verifiers passed over, and why."""
    note: str = ""

    @property
    def peer_id(self) -> str:
        return self.work.peer_id

    @property
    def node_key(self) -> bytes:
        return self.work.node_key

    @property
    def start(self) -> int:
        return self.work.hop.start

    @property
    def end(self) -> int:
        return self.work.hop.end

    @property
    def session_id(self) -> bytes:
        return self.work.session_id

    @property
    def verifiers(self) -> tuple[str, ...]:
        return (self.verifier.peer_id,) if self.verifier is not None else ()

    @property
    def score(self) -> float:
        """The largest score the verifier signed (NaN when unchecked)."""
        scores = [parse_score(record.verdict.score) for record in self.records]
        return max(scores) if scores else float("nan")

    @property
    def recomputed_positions(self) -> int:
        return sum(record.verdict.recomputed_positions for record in self.records)


class SpotChecker:
    """Schedules checks and runs them (one per client; its sessions share it)."""

    def __init__(
        self,
        swarm: Swarm,
        manifest: Manifest,
        client_key: bytes,
        config: SpotCheckConfig,
        rules: CheckRules | None = None,
        ledger: CheckLedger | None = None,
    ) -> None:
        self.swarm = swarm
        self.manifest = manifest
        self.config = config
        self.rules = rules or CheckRules(manifest.model_digest)
        self.ledger = ledger
        self.choice = VerifierChoice(
            swarm, manifest.model_digest, manifest.num_blocks, client_key, ledger, config.seed
        )
        self._random = random.Random(config.seed)
        self._published = False

    def wants_check(self) -> bool:
        return self.config.rate > 0 and self._random.random() < self.config.rate

    async def check(
        self, work: NodeWork, upto: int, streams: CheckStreams, avoid: frozenset[str]
    ) -> CheckOutcome:
        """Check ``work``'s steps ``[0, upto)``; never raises for a node's or verifier's fault."""
        profile = profile_of_record(work.hop.record)
        if profile is None:
            note = f"no tolerance for {work.hop.record.dtype}/{work.hop.record.quant}"
            return CheckOutcome(work, upto, "unchecked", None, (), None, note=note)
        await self._fetch_calibrations()
        threshold = self.rules.threshold(profile)
        choice = await self.choice.choose(work, upto, avoid)
        skipped: list[str] = []
        for key, record in choice.order:
            name = record.peer_id if record is not None else peer_name_of(key)
            if record is None:
                skipped.append(f"{name}: not within reach in the swarm")
                continue
            if record.peer_id in avoid:
                skipped.append(f"{name}: not used by this session any more")
                continue
            try:
                records = await streams.check(record, work, upto, choice.epoch, profile, threshold)
            except (TimeoutError, CorollaError) as error:
                skipped.append(f"{name}: did not answer ({type(error).__name__}: {error})")
                continue
            failed = any(not r.verdict.passed for r in records)
            return CheckOutcome(
                work,
                upto,
                "failed" if failed else "passed",
                record,
                tuple(records),
                choice.beacon,
                tuple(skipped),
                choice.note,
            )
        why = "no verifier within reach" + (f" ({'; '.join(skipped)})" if skipped else "")
        note = f"{why}; {choice.note}" if choice.note else why
        return CheckOutcome(
            work, upto, "unchecked", None, (), choice.beacon, tuple(skipped), note=note
        )

    async def _fetch_calibrations(self) -> None:
        """The ledger's published calibrations, once (the local ones stand if it has none)."""
        if self._published or self.ledger is None:
            return
        self._published = True
        try:
            self.rules.publish(await self.ledger.calibrations(self.manifest.model_digest))
        except (LedgerError, InvalidInput):
            self._published = False
