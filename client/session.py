"""An inference session through the swarm: one stream per node, every receipt checked, failover.

Each step's hidden states go through the route's nodes in order. Before the client uses a
node's output it checks the node's receipt: signed by the key the node announced, naming this
request, this output tensor, and the chain of the session's earlier steps on that node. A node
that fails, times out, or returns anything that does not check out is banned for a while; the
blocks it served are routed anew, the replacement's cache is rebuilt by replaying every input
that node had seen (as one prefill), and the step is retried. Failures are bounded by
`ClientConfig.max_failovers`; when no replacement exists the caller gets RouteUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from corolla.client.generation import Rewind
from corolla.client.priority import encode_ticket
from corolla.client.routing import Hop
from corolla.client.spotcheck import CheckOutcome, SpotChecker
from corolla.client.swarm import Swarm
from corolla.errors import (
    BadReceipt,
    InvalidInput,
    NodeError,
    RouteUnavailable,
    SessionError,
    VerificationError,
)
from corolla.node.behaviour import BENCHMARK_UNSIGNED_ENV, unsigned_signer
from corolla.node.model.manifest import Manifest
from corolla.node.protocol.messages import PRIORITY_FREE, PRIORITY_HIGH, OpenSession, StepMessage
from corolla.node.protocol.stream import InferenceStream
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.evidence import StepClaim
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, sign_request, verify_receipt
from corolla.verify.tickets import Ticket
from corolla.version import PROTOCOL_VERSION

__all__ = ["Failover", "SwarmSession", "WorkRecord"]

_NODE_FAULTS = (NodeError, VerificationError, InvalidInput)


"""What a node can cause: each bans the node and triggers failover, never reaches the user."""


@dataclass(frozen=True)
class WorkRecord:
    """One verified step: the client's signed request and the node's signed receipt."""

    peer_id: str
    request: StepRequest
    receipt: Receipt

    def to_dict(self) -> dict[str, object]:
        return {
            "peer_id": self.peer_id,
            "request": self.request.to_dict(),
            "receipt": self.receipt.to_dict(),
        }


@dataclass(frozen=True)
class Failover:
    """A node the session replaced, why, and with whom."""

    peer_id: str
    start: int
    end: int
    reason: str
    replacements: tuple[str, ...]


@dataclass
class _Link:
    hop: Hop
    stream: InferenceStream
    span_digest: bytes
    step: int = 0
    position: int = 0
    chain: bytes = GENESIS_CHAIN
    claims: list[StepClaim] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # per-sequence position of each step
    verified: int = 0  # leading steps covered by a passed spot-check
    checked: bool = False


class SwarmSession:
    """Async core of a swarm inference session. Use through RemoteBackbone for a sync face."""

    def __init__(
        self,
        swarm: Swarm,
        manifest: Manifest,
        identity: Identity,
        batch_size: int,
        max_length: int,
        checker: SpotChecker | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        self.swarm = swarm
        self.ticket = ticket
        self.priority_notes: list[str] = []
        self.granted: dict[str, str] = {}  # peer id -> priority the node granted ("high"/"free")
        self.checker = checker
        self.checks: list[CheckOutcome] = []
        self._pending: list[tuple[_Link, asyncio.Task[CheckOutcome]]] = []
        self._first_length = 0
        self.manifest = manifest
        self.identity = identity
        self.batch_size = batch_size
        self.max_length = max_length
        self.session_id = os.urandom(16)
        self.past_length = 0
        self.work: list[WorkRecord] = []
        self._links: list[_Link] = []
        self._history: dict[int, list[torch.Tensor]] = {}
        self.failovers: list[Failover] = []
        self.faults: list[str] = []
        self.rewinds: list[CheckOutcome] = []
        self._closed = False
        self._unsigned = os.environ.get(BENCHMARK_UNSIGNED_ENV) == "1"
        self._signer = unsigned_signer(identity) if self._unsigned else identity

    @property
    def route(self) -> list[Hop]:
        return [link.hop for link in self._links]

    async def open(self) -> None:
        self._links, _ = await self._build(0, self.manifest.num_blocks, replay=False)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, new, hidden] -> [batch, new, hidden] through every block.

        Raises Rewind (after recomputing honestly) when a spot-check proved that a node's
        earlier outputs were wrong: the caller drops what it derived after `Rewind.kept`.
        """
        if self._closed:
            raise SessionError("this inference session is closed")
        await self._settle(wait=False)
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size:
            raise InvalidInput(f"expected hidden states [{self.batch_size}, tokens, hidden]")
        if self.past_length + hidden.shape[1] > self.max_length:
            raise SessionError(f"the session's max_length of {self.max_length} is exceeded")
        x, index = hidden.contiguous(), 0
        while index < len(self._links):
            link = self._links[index]
            try:
                y = await self._forward(link, x)
            except _NODE_FAULTS as error:
                replacements = await self._replace(link, error)
                self._links[index : index + 1] = replacements
                continue
            self._history.setdefault(link.hop.start, []).append(x)
            if self.checker is not None and self.checker.wants_check():
                self._schedule_check(link)
            x, index = y, index + 1
        if not self._first_length:
            self._first_length = hidden.shape[1]
        self.past_length += hidden.shape[1]
        return x

    async def finish(self) -> None:
        """Check every node at least once, wait for the checks; may raise Rewind."""
        if self.checker is not None and self.checker.config.at_least_once:
            for link in self._links:
                if link.claims and not link.checked:
                    self._schedule_check(link)
        await self._settle(wait=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _, task in self._pending:
            task.cancel()
        for link in self._links:
            with contextlib.suppress(Exception):
                await link.stream.close()

    # ------------------------------------------------------------------ one node, one step

    async def _open_link(self, hop: Hop) -> _Link:
        stream = InferenceStream(self.swarm.p2p, PeerID.from_base58(hop.peer_id))
        request = OpenSession(
            session_id=self.session_id,
            batch_size=self.batch_size,
            max_length=self.max_length,
            start=hop.start,
            end=hop.end,
            client_key=self.identity.public_key,
            ticket=encode_ticket(self.ticket) if self.ticket is not None else None,
        )
        try:
            opened = await stream.open(request, timeout=self.swarm.config.open_timeout)
        except BaseException:
            await stream.abort()
            raise
        self.granted[hop.peer_id] = opened.priority
        if opened.priority != PRIORITY_HIGH:  # why the ticket was not honoured
            self._note_priority(hop, opened.note)
        return _Link(hop, stream, self.manifest.span_digest(hop.start, hop.end))

    def _note_priority(self, hop: Hop, note: str) -> None:
        """Keep a node's word on why the ticket was not honoured (each note once)."""
        text = f"{hop.peer_id}: {note}"
        if note and text not in self.priority_notes:
            self.priority_notes.append(text)

    async def _forward(self, link: _Link, x: torch.Tensor) -> torch.Tensor:
        """Send x through one node; return its output only if the receipt checks out."""
        hop = link.hop
        tokens = x.shape[0] * x.shape[1]
        request = sign_request(
            self._signer,
            protocol_version=PROTOCOL_VERSION,
            model_digest=self.manifest.model_digest,
            span_digest=link.span_digest,
            start=hop.start,
            end=hop.end,
            session_id=self.session_id,
            step=link.step,
            position=link.position,
            tokens=tokens,
            input_digest=tensor_digest(x),
            ticket_digest=self.ticket.digest() if self.ticket is not None else None,
        )
        reply = await link.stream.step(
            StepMessage(request, x), timeout=self.swarm.config.step_timeout
        )
        y = reply.hidden
        if y.shape != x.shape or y.dtype != x.dtype:
            raise BadReceipt(f"node {hop.peer_id} returned {tuple(y.shape)} for {tuple(x.shape)}")
        if not bool(torch.isfinite(y).all()):
            raise BadReceipt(f"node {hop.peer_id} returned NaN or infinite hidden states")
        if not self._unsigned:
            verify_receipt(
                reply.receipt,
                request=request,
                output=y,
                previous_chain=link.chain,
                node_key=hop.record.public_key,
            )
        link.claims.append(StepClaim(request, reply.receipt, x, y))
        link.starts.append(link.position // self.batch_size)
        link.step += 1
        link.position += tokens
        link.chain = reply.receipt.chain_digest
        self.work.append(WorkRecord(hop.peer_id, request, reply.receipt))
        if reply.note:  # the step ran at free priority: the ticket no longer pays on this node
            self.granted[hop.peer_id] = PRIORITY_FREE
            self._note_priority(hop, reply.note)
        return y

    # ------------------------------------------------------------------ routing and failover

    async def _build(
        self, start: int, end: int, *, replay: bool
    ) -> tuple[list[_Link], torch.Tensor | None]:
        """Open links covering [start, end); with `replay`, rebuild their caches from history.

        A node that fails while this happens is banned and the whole range routed again,
        within the session's failover budget.
        """
        while True:
            route = await self.swarm.route(
                self.manifest.model_digest, self.manifest.num_blocks, start, end
            )
            links: list[_Link] = []
            try:
                x = self._replay_input(start) if replay else None
                for hop in route:
                    link = await self._open_link(hop)
                    links.append(link)
                    if x is not None:
                        self._history[hop.start] = [x]
                        x = await self._forward(link, x)
                return links, x
            except _NODE_FAULTS as error:
                for link in links:
                    await link.stream.abort()
                self._strike(hop, error)

    async def _replace(self, link: _Link, error: Exception) -> list[_Link]:
        await link.stream.abort()
        reason = self._strike(link.hop, error)
        links, _ = await self._build(link.hop.start, link.hop.end, replay=True)
        peers = tuple(new.hop.peer_id for new in links)
        self.failovers.append(
            Failover(link.hop.peer_id, link.hop.start, link.hop.end, reason, peers)
        )
        return links

    def _strike(self, hop: Hop, error: Exception) -> str:
        """Ban the node behind `hop`; give up once the session's failover budget is spent."""
        reason = f"{type(error).__name__}: {error}"
        self.swarm.bans.ban(hop.peer_id, reason)
        self.faults.append(f"{hop.peer_id} (blocks {hop.start}:{hop.end}): {reason}")
        if len(self.faults) > self.swarm.config.max_failovers:
            raise RouteUnavailable(
                f"gave up after {len(self.faults)} node failures in one session; last: node "
                f"{hop.peer_id} (blocks {hop.start}:{hop.end}) {reason}"
            ) from error
        return reason

    # ------------------------------------------------------------------ spot-checks and rewinds

    def _schedule_check(self, link: _Link) -> None:
        if self.checker is None:
            return
        link.checked = True
        task = asyncio.ensure_future(self.checker.check(link.hop, tuple(link.claims)))
        self._pending.append((link, task))

    async def _settle(self, *, wait: bool) -> None:
        """Collect finished checks (all of them if `wait`); rewind if a node was caught."""
        if not self._pending:
            return
        if wait:
            timeout = self.checker.config.timeout * 3 if self.checker else None
            await asyncio.wait([task for _, task in self._pending], timeout=timeout)
        caught: tuple[_Link, CheckOutcome] | None = None
        still: list[tuple[_Link, asyncio.Task[CheckOutcome]]] = []
        for link, task in self._pending:
            if not task.done():
                still.append((link, task))
                continue
            outcome = task.result()
            if outcome.verdict == "caught" and any(
                earlier.peer_id == outcome.peer_id and earlier.verdict == "caught"
                for earlier in self.checks
            ):
                continue  # another check of the same cheater, caught already
            self.checks.append(outcome)
            if outcome.passed:
                link.verified = max(link.verified, outcome.steps)
            elif outcome.verdict == "caught" and caught is None:
                caught = (link, outcome)
        self._pending = still
        if caught is not None:
            await self._rewind(*caught)

    async def _rewind(self, link: _Link, outcome: CheckOutcome) -> None:
        """Drop everything after the caught node's last verified step; recompute honestly."""
        first_bad = link.starts[min(link.verified, len(link.starts) - 1)]
        kept = min(self.past_length, max(first_bad + 1, self._first_length))
        base = torch.cat(self._history[0], dim=1)[:, :kept]  # the client's own embeddings
        for _, task in self._pending:
            task.cancel()
        self._pending = []
        for old in self._links:
            await old.stream.abort()
        self.session_id = os.urandom(16)  # a new session on every node, caches built afresh
        self._history = {0: [base]}
        self._links, output = await self._build(0, self.manifest.num_blocks, replay=True)
        self.past_length = kept
        if output is None:
            raise SessionError("nothing to recompute after a rewind")
        self.rewinds.append(outcome)
        raise Rewind(kept, output[:, -1:, :])

    def _replay_input(self, boundary: int) -> torch.Tensor | None:
        """Every input that entered blocks at `boundary` so far, as one [batch, past, hidden]."""
        seen = self._history.get(boundary)
        if not seen:
            return None
        return torch.cat(seen, dim=1)
