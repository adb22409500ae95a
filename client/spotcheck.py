"""Spot-checks: recompute a node's steps on a second peer, in the background, and judge them.

After a step on a node, the client checks that node with probability `rate` (and every node at
least once per session): a verifier that hosts the same blocks with the same compute profile
(dtype, quantization), and is not the node, recomputes every input the node has received so far
in ONE forward call. All the node's outputs up to that step are compared with the recomputation
under the profile's measured tolerance (``corolla.verify.tolerance``), so a passed check
verifies every earlier step of that node too.

A mismatch asks a third peer. If it sides with the verifier, the node is guilty: the client
bans it, keeps fraud evidence (``corolla.verify.evidence``) for the ledger, and the session
rewinds to the node's last verified step. If the third sides with the node, the verifier lied
and is banned. With no third peer the client still drops the node (and keeps the evidence for
the ledger's referee to judge).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from hivemind.p2p import PeerID

from corolla.client.routing import Hop
from corolla.client.swarm import Swarm
from corolla.errors import CorollaError, InvalidInput, VerificationError
from corolla.node.model.manifest import Manifest
from corolla.node.protocol.messages import StepMessage
from corolla.node.protocol.records import ServerRecord
from corolla.node.protocol.stream import request_forward
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.evidence import FraudEvidence, Recomputation, StepClaim
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request, verify_receipt
from corolla.verify.tolerance import PROFILES, compare
from corolla.version import PROTOCOL_VERSION

__all__ = ["CheckOutcome", "SpotCheckConfig", "SpotChecker", "profile_of_record"]


@dataclass(frozen=True)
class SpotCheckConfig:
    rate: float = 0.05
    """Probability that a step triggers a check of the node that computed it."""
    at_least_once: bool = True
    """Check every node of a session at least once, at its end."""
    timeout: float = 30.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise InvalidInput("the spot-check rate must be in [0, 1]")
        if not self.timeout > 0:
            raise InvalidInput("the spot-check timeout must be positive")


@dataclass(frozen=True)
class CheckOutcome:
    """One spot-check: who was checked, by whom, over how many of its steps, and the verdict."""

    peer_id: str
    node_key: bytes
    start: int
    end: int
    session_id: bytes
    steps: int  # steps 0..steps-1 of the node's session were compared
    verdict: str  # "passed" | "caught" | "verifier-lied" | "unchecked"
    score: float
    verifiers: tuple[str, ...]
    recomputations: tuple[Recomputation, ...]
    evidence: FraudEvidence | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict in ("passed", "verifier-lied")


def profile_of_record(record: ServerRecord) -> str | None:
    return PROFILES.get((record.dtype, record.quant))


class SpotChecker:
    """Schedules and runs the checks of one client; results are read by the session."""

    def __init__(
        self, swarm: Swarm, manifest: Manifest, identity: Identity, config: SpotCheckConfig
    ) -> None:
        self.swarm = swarm
        self.manifest = manifest
        self.identity = identity
        self.config = config
        self._random = random.Random(config.seed)

    def wants_check(self) -> bool:
        return self.config.rate > 0 and self._random.random() < self.config.rate

    async def check(self, hop: Hop, claims: tuple[StepClaim, ...]) -> CheckOutcome:
        """Check a node's claims (its steps 0..k); never raises for a node's or verifier's fault."""
        profile = profile_of_record(hop.record)
        base = dict(
            peer_id=hop.peer_id,
            node_key=hop.record.public_key,
            start=hop.start,
            end=hop.end,
            session_id=claims[0].request.session_id,
            steps=len(claims),
        )
        if profile is None:
            return CheckOutcome(
                **base,
                verdict="unchecked",
                score=float("nan"),
                verifiers=(),
                recomputations=(),
                note=f"no tolerance for {hop.record.quant}",
            )
        tried: set[str] = {hop.peer_id}
        first = await self._recompute_somewhere(hop, claims, tried)
        if first is None:
            return CheckOutcome(
                **base,
                verdict="unchecked",
                score=float("nan"),
                verifiers=(),
                recomputations=(),
                note="no independent verifier available",
            )
        verifier, recomputation = first
        claimed = torch.cat([claim.output for claim in claims], dim=1)
        comparison = compare(claimed, recomputation.output, profile)
        if comparison.passed:
            return CheckOutcome(
                **base,
                verdict="passed",
                score=comparison.score,
                verifiers=(verifier,),
                recomputations=(recomputation,),
            )
        second = await self._recompute_somewhere(hop, claims, tried)
        evidence_parts: tuple[Recomputation, ...] = (recomputation,)
        if second is not None:
            referee, recomputation_2 = second
            if compare(claimed, recomputation_2.output, profile).passed:
                self.swarm.bans.ban(verifier, "its recomputation disagreed with two other peers")
                return CheckOutcome(
                    **base,
                    verdict="verifier-lied",
                    score=comparison.score,
                    verifiers=(verifier, referee),
                    recomputations=(recomputation_2,),
                    note=f"verifier {verifier} lied",
                )
            evidence_parts = (recomputation, recomputation_2)
        self.swarm.bans.ban(hop.peer_id, f"caught by a spot-check: {comparison.describe()}")
        evidence = FraudEvidence(profile, claims, evidence_parts)
        return CheckOutcome(
            **base,
            verdict="caught",
            score=comparison.score,
            verifiers=tuple(v for v in (verifier, second and second[0]) if v),
            recomputations=evidence_parts,
            evidence=evidence,
            note=comparison.describe(),
        )

    def _verifiers(
        self, hop: Hop, records: list[ServerRecord], tried: set[str]
    ) -> list[ServerRecord]:
        profile = (hop.record.dtype, hop.record.quant)
        usable = [
            record
            for record in records
            if record.peer_id not in tried
            and self.swarm.usable(record)
            and record.start <= hop.start
            and hop.end <= record.end
            and (record.dtype, record.quant) == profile
            and record.public_key != self.identity.public_key
            and (self.swarm.config.subspans or (record.start, record.end) == (hop.start, hop.end))
        ]
        self._random.shuffle(usable)
        return usable

    async def _recompute_somewhere(
        self, hop: Hop, claims: tuple[StepClaim, ...], tried: set[str]
    ) -> tuple[str, Recomputation] | None:
        records = await self.swarm.servers(self.manifest.model_digest, self.manifest.num_blocks)
        for record in self._verifiers(hop, records, tried):
            tried.add(record.peer_id)
            try:
                return record.peer_id, await self._recompute(record, hop, claims)
            except (TimeoutError, CorollaError) as error:
                self.swarm.bans.ban(record.peer_id, f"failed a spot-check recomputation: {error}")
        return None

    async def _recompute(
        self, record: ServerRecord, hop: Hop, claims: tuple[StepClaim, ...]
    ) -> Recomputation:
        prefix = torch.cat([claim.input for claim in claims], dim=1)  # batch, all tokens, hidden
        request = sign_request(
            self.identity,
            protocol_version=PROTOCOL_VERSION,
            model_digest=self.manifest.model_digest,
            span_digest=self.manifest.span_digest(hop.start, hop.end),
            start=hop.start,
            end=hop.end,
            session_id=os.urandom(16),
            step=0,
            position=0,
            tokens=prefix.shape[0] * prefix.shape[1],
            input_digest=tensor_digest(prefix),
        )
        reply = await request_forward(
            self.swarm.p2p,
            PeerID.from_base58(record.peer_id),
            StepMessage(request, prefix),
            timeout=self.config.timeout,
        )
        if reply.hidden.shape != prefix.shape or not bool(torch.isfinite(reply.hidden).all()):
            raise VerificationError("the verifier returned a malformed recomputation")
        verify_receipt(
            reply.receipt,
            request=request,
            output=reply.hidden,
            previous_chain=GENESIS_CHAIN,
            node_key=record.public_key,
        )
        return Recomputation(request, reply.receipt, reply.hidden)
