"""An inference session through the swarm: one stream per node, every receipt checked, failover.

Each step's hidden states go through the route's nodes in order. Before the client uses a
node's output it checks the node's receipt: signed by the key the node announced, naming this
request, this output tensor, and the chain of the session's earlier steps on that node. A node
that fails, times out, or returns anything that does not check out is banned for a while; the
blocks it served are routed anew, the replacement's cache is rebuilt by replaying every input
that node had seen (as one prefill), and the step is retried. Failures are bounded by
`ClientConfig.max_failovers`; when no replacement exists the caller gets RouteUnavailable.

Spot-checks run in the background (:class:`~corolla.client.check_book.CheckBook`): when one
proves a node's outputs wrong (by the ledger's ruling, or the head rule), or its dispute cannot
be judged, the session drops every token that depends on that node's unverified steps, routes
around it, replays the kept prefix on fresh node-sessions and raises
:class:`~corolla.client.generation.Rewind`.

Streams are opened through the swarm's transport (:mod:`corolla.client.transport`), and every
call to a node has the session's own deadline. What happened (verified work, checks, disputes,
rewinds, failovers, priority, unverified tokens) is written to the session's
:class:`~corolla.client.session_log.SessionLog`. Receipts are checked unless
``ClientConfig.verify_receipts`` is off (benchmarks only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import torch

from corolla.client.check_book import CheckBook
from corolla.client.check_streams import CheckStreams
from corolla.client.generation import Draw, Rewind, TokenRange
from corolla.client.head_rule import Logits
from corolla.client.node_work import NodeWork
from corolla.client.priority import encode_ticket
from corolla.client.routing import Hop
from corolla.client.session_log import Failover, RewindRecord, SessionLog, WorkRecord
from corolla.client.signer import Signer
from corolla.client.spotcheck import SpotChecker
from corolla.client.swarm import Swarm
from corolla.client.transport import NodeStream
from corolla.errors import (
    BadReceipt,
    InvalidInput,
    NodeError,
    NodeUnavailable,
    RouteUnavailable,
    SessionError,
    VerificationError,
)
from corolla.node.model.manifest import Manifest
from corolla.node.protocol.messages import PRIORITY_FREE, PRIORITY_HIGH, OpenSession, StepMessage
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.evidence import StepClaim
from corolla.verify.receipts import sign_request, verify_receipt
from corolla.verify.tickets import Ticket
from corolla.version import PROTOCOL_VERSION

__all__ = ["SwarmSession"]

T = TypeVar("T")

# What a node can cause: each bans the node and triggers failover, never reaches the user.
_NODE_FAULTS = (NodeError, VerificationError, InvalidInput)


async def _within(hop: Hop, what: str, timeout: float, call: Awaitable[T]) -> T:
    """Await a node's answer; a node that takes longer than `timeout` is unavailable."""
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError:
        raise NodeUnavailable(
            f"node {hop.peer_id} did not answer {what} within {timeout} s", hop.peer_id
        ) from None


@dataclass
class _Link:
    hop: Hop
    stream: NodeStream
    span_digest: bytes
    work: NodeWork
    step: int = 0
    position: int = 0
    chain: bytes = GENESIS_CHAIN


class SwarmSession:
    """Async core of a swarm inference session. Use through RemoteBackbone for a sync face."""

    def __init__(
        self,
        swarm: Swarm,
        manifest: Manifest,
        identity: Signer,
        batch_size: int,
        max_length: int,
        checker: SpotChecker | None = None,
        ticket: Ticket | None = None,
        logits: Logits | None = None,
    ) -> None:
        self.swarm = swarm
        self.manifest = manifest
        self.identity = identity
        """Signs every step request (normally the client's Identity)."""
        self.batch_size = batch_size
        self.max_length = max_length
        self.checker = checker
        self.ticket = ticket
        self.log = SessionLog()
        self.session_id = os.urandom(16)
        self.past_length = 0
        self._first_length = 0
        self._links: list[_Link] = []
        self._history: dict[int, list[torch.Tensor]] = {}
        self._last: tuple[NodeWork, int] | None = None
        """The node-session and step whose output the latest tokens are drawn from."""
        streams = None
        if checker is not None:
            timeout = checker.config.timeout
            streams = CheckStreams(
                swarm.transport, identity, manifest, batch_size, max_length, timeout
            )
        self.book = CheckBook(checker, streams, logits, self.log, swarm.bans, manifest.num_blocks)
        self._closed = False

    @property
    def route(self) -> list[Hop]:
        return [link.hop for link in self._links]

    async def open(self) -> None:
        self._links, _ = await self._build(0, self.manifest.num_blocks, replay=False)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, new, hidden] -> [batch, new, hidden] through every block.

        Raises Rewind (after recomputing without it) when a node's earlier outputs were proven
        wrong or disputed: the caller drops what it derived after `Rewind.kept`.
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
            self.book.stepped(link.work)
            x, index = y, index + 1
        last = self._links[-1]
        self._last = (last.work, last.step - 1)
        if not self._first_length:
            self._first_length = hidden.shape[1]
        self.past_length += hidden.shape[1]
        return x

    def drew(self, draw: Draw) -> None:
        """The tokens drawn from the latest output (the head rule and the unverified count)."""
        work, step = self._last if self._last is not None else (None, 0)
        self.book.drew(draw, work, step)

    async def finish(self) -> None:
        """Check every node at least once, wait for the checks and rulings; may raise Rewind."""
        await self._settle(wait=True)
        self.log.set_unverified(self.book.unverified())

    def unverified(self) -> tuple[TokenRange, ...]:
        """After ``finish``: the generated tokens whose steps went unchecked, and why."""
        return self.log.unverified

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.book.close()
        for link in self._links:
            with contextlib.suppress(Exception):
                await link.stream.close()

    # ------------------------------------------------------------------ one node, one step

    async def _open_link(self, hop: Hop) -> _Link:
        stream = self.swarm.transport.open_stream(hop.peer_id)
        request = OpenSession(
            session_id=self.session_id,
            batch_size=self.batch_size,
            max_length=self.max_length,
            start=hop.start,
            end=hop.end,
            client_key=self.identity.public_key,
            ticket=encode_ticket(self.ticket) if self.ticket is not None else None,
        )
        timeout = self.swarm.config.open_timeout
        try:
            opened = await _within(
                hop, "the session's opening", timeout, stream.open(request, timeout)
            )
        except BaseException:
            await stream.abort()
            raise
        # A node's word on why the ticket was not honoured is kept (it has none when it was).
        note = opened.note if opened.priority != PRIORITY_HIGH else ""
        self.log.grant(hop.peer_id, opened.priority, note)
        work = NodeWork(hop, self.session_id, self.book.generation)
        self.book.opened(work)
        return _Link(hop, stream, self.manifest.span_digest(hop.start, hop.end), work)

    async def _forward(self, link: _Link, x: torch.Tensor) -> torch.Tensor:
        """Send x through one node; return its output only if the receipt checks out."""
        hop = link.hop
        tokens = x.shape[0] * x.shape[1]
        request = sign_request(
            self.identity,
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
        timeout = self.swarm.config.step_timeout
        reply = await _within(
            hop, f"step {link.step}", timeout, link.stream.step(StepMessage(request, x), timeout)
        )
        y = reply.hidden
        if y.shape != x.shape or y.dtype != x.dtype:
            raise BadReceipt(f"node {hop.peer_id} returned {tuple(y.shape)} for {tuple(x.shape)}")
        if not bool(torch.isfinite(y).all()):
            raise BadReceipt(f"node {hop.peer_id} returned NaN or infinite hidden states")
        if self.swarm.config.verify_receipts:
            verify_receipt(
                reply.receipt,
                request=request,
                output=y,
                previous_chain=link.chain,
                node_key=hop.record.public_key,
            )
        link.work.add(
            StepClaim(request, reply.receipt, x, y), link.position // x.shape[0], time.time()
        )
        link.step += 1
        link.position += tokens
        link.chain = reply.receipt.chain_digest
        self.log.add_work(WorkRecord(hop.peer_id, request, reply.receipt))
        if reply.note:  # the step ran at free priority: the ticket no longer pays on this node
            self.log.grant(hop.peer_id, PRIORITY_FREE, reply.note)
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
            route = await self._route(start, end)
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

    async def _route(self, start: int, end: int) -> list[Hop]:
        """A route over [start, end); if there is none, the error names this session's faults
        and the peers it stopped using (an unjudged dispute)."""
        avoid = frozenset(self.book.avoid)
        try:
            return await self.swarm.route(
                self.manifest.model_digest, self.manifest.num_blocks, start, end, avoid
            )
        except RouteUnavailable as error:
            notes = []
            if self.log.faults:
                notes.append(f"nodes that failed in this session: {'; '.join(self.log.faults)}")
            if avoid:
                notes.append(
                    f"peers this session stopped using over a dispute (unjudged or pending): "
                    f"{', '.join(sorted(avoid))}"
                )
            if not notes:
                raise
            raise RouteUnavailable(f"{error}; {'; '.join(notes)}") from None

    async def _replace(self, link: _Link, error: Exception) -> list[_Link]:
        await link.stream.abort()
        reason = self._strike(link.hop, error)
        links, _ = await self._build(link.hop.start, link.hop.end, replay=True)
        peers = tuple(new.hop.peer_id for new in links)
        self.log.add_failover(
            Failover(link.hop.peer_id, link.hop.start, link.hop.end, reason, peers)
        )
        return links

    def _strike(self, hop: Hop, error: Exception) -> str:
        """Ban the node behind `hop`; give up once the session's failover budget is spent."""
        reason = f"{type(error).__name__}: {error}"
        self.swarm.bans.ban(hop.peer_id, reason)
        faults = self.log.add_fault(hop.peer_id, hop.start, hop.end, reason)
        if faults > self.swarm.config.max_failovers:
            raise RouteUnavailable(
                f"gave up after {faults} node failures in one session; last: node "
                f"{hop.peer_id} (blocks {hop.start}:{hop.end}) {reason}"
            ) from error
        return reason

    # ------------------------------------------------------------------ spot-checks and rewinds

    async def _settle(self, *, wait: bool) -> None:
        """Apply finished checks and rulings (all of them if `wait`); rewind if one asks."""
        works = await self.book.settle(wait=wait)
        if works:
            await self._rewind(works)

    async def _rewind(self, works: list[NodeWork]) -> None:
        """Drop every token that depends on an unverified step of ``works``; recompute the kept
        prefix on fresh node-sessions (routed around the peers the session avoids)."""
        firsts = [(self.book.first_tainted(work), work) for work in works]
        token, work = min(((t, w) for t, w in firsts if t is not None), key=lambda tw: tw[0])
        kept = min(self.past_length, self._first_length + token)
        base = torch.cat(self._history[0], dim=1)[:, :kept]  # the client's own embeddings
        for old in self._links:
            await old.stream.abort()
        self.book.rewound(token)
        self.session_id = os.urandom(16)  # a new session on every node, caches built afresh
        self._history = {0: [base]}
        self._links, output = await self._build(0, self.manifest.num_blocks, replay=True)
        self.past_length = kept
        if output is None:
            raise SessionError("nothing to recompute after a rewind")
        self._last = (self._links[-1].work, 0)
        reason = work.why_unverified or "its outputs were disputed"
        hop = work.hop
        self.log.add_rewind(RewindRecord(hop.peer_id, hop.start, hop.end, kept, reason))
        raise Rewind(kept, output[:, -1:, :])

    def _replay_input(self, boundary: int) -> torch.Tensor | None:
        """Every input that entered blocks at `boundary` so far, as one [batch, past, hidden]."""
        seen = self._history.get(boundary)
        if not seen:
            return None
        return torch.cat(seen, dim=1)
