"""The node's RPC service: inference streams, one-shot forwards and info, over hivemind P2P.

Every message is untrusted. A step is checked before anything is computed, in this order:
message shape and fields; the client's signature; session and client key; step order (a retry
of the last step gets its stored reply back); model, blocks, span, hidden states' dtype and shape
[batch, tokens, hidden], ``tokens``; batch, ``position`` and room left in the session; then, on
the compute thread, the input digest and finiteness (the checks are the functions of
:mod:`corolla.node.step_checks`). Any failure is answered with an error message and leaves the
session as it was; only a broken framing (the stream is out of sync), an idle timeout or an
internal failure of the span ends the stream. Compute runs on one worker thread so the event
loop keeps serving other peers.

The handlers are registered under the protocol's fixed names
(:data:`~corolla.node.protocol.messages.HANDLE_INFO` and its siblings), whatever the class is
called, so a subclass serves the same protocol.

Every computation (inference steps and one-shot forwards) waits its turn in one
:class:`~corolla.node.scheduler.PriorityScheduler`: steps of sessions whose ticket the node honours
(:mod:`corolla.node.ticket_book`) run at high priority, everything else free; a full queue is a
``busy`` refusal that leaves the session as it was. A ticket is checked at ``open`` (the reply says
``high`` or ``free`` and why) and charged per step (:mod:`corolla.node.admission`); a ticket that
is not honoured, or runs out, never fails a step: the step runs free and its reply carries a
note. Charged steps' (request, receipt) pairs wait in the ticket book for
:mod:`corolla.node.settlement` to redeem them.

A node is also a verifier: on a *check session* a client sends check steps (the node computes the
next step of its session, which mirrors another node's, and compares it with that node's signed
claims). :mod:`corolla.node.verifier` holds the checks made before anything is computed (after the
step checks above), the threshold and the verdict; a session that took a check takes only checks.

What a node does with a step goes through a :class:`~corolla.node.behaviour.Behaviour` (honest
by default; re-exported here): :mod:`corolla.simulations.adversaries` supplies dishonest ones.

``ServiceConfig.benchmark_unsigned`` exists only for ``benchmarks/unsigned.py``, which sets it in
the config it builds, to measure what signatures cost: the node then checks no client signature
(the benchmark also gives it a behaviour that signs receipts with zeros, which every normal
client rejects). Nothing else sets it; no environment variable does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from corolla.errors import CorollaError, InvalidInput
from corolla.node.admission import admit_step, opened_priority
from corolla.node.behaviour import Behaviour
from corolla.node.model.span import Span
from corolla.node.protocol.framing import write_parts
from corolla.node.protocol.messages import (
    HANDLE_FORWARD,
    HANDLE_INFERENCE,
    HANDLE_INFO,
    KIND_CHECK,
    KIND_FORWARD,
    KIND_OPEN,
    CheckMessage,
    CheckOutput,
    ErrorCode,
    ErrorReply,
    NodeInfo,
    OpenSession,
    SessionOpened,
    StepMessage,
    StepOutput,
)
from corolla.node.protocol.records import NodeState
from corolla.node.protocol.tensors import (
    Message,
    WireLimits,
    decode_frame,
    encode_message,
    receive_frame,
)
from corolla.node.scheduler import Priority, PriorityScheduler, SchedulerConfig
from corolla.node.sessions import Session, SessionConfig, SessionTable
from corolla.node.step_checks import (
    check_input,
    check_next_step,
    check_one_shot,
    check_open,
    check_request,
    check_session_owner,
    requested_span,
)
from corolla.node.stream_ends import LINGER_SECONDS, linger, requests_from
from corolla.node.ticket_book import TicketBook, TicketConfig
from corolla.node.verifier import Verifier
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, verify_request, work_units
from corolla.verify.tolerance import Calibration
from corolla.version import __version__

__all__ = ["Behaviour", "NodeService", "ServiceConfig"]

logger = logging.getLogger("corolla.node")

Reply = StepOutput | CheckOutput


@dataclass(frozen=True)
class ServiceConfig:
    """Limits of the service: per message (wire), per node (sessions, queue), and tickets."""

    limits: WireLimits = field(default_factory=WireLimits)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tickets: TicketConfig = field(default_factory=TicketConfig)
    benchmark_unsigned: bool = False
    """Benchmarks only (``benchmarks/unsigned.py`` sets it): check no client's signature."""


class NodeService:
    """RPC handlers of a node serving one span. Register them with :meth:`add_handlers`.

    ``state`` and ``throughput`` are set by the server process and reported by ``rpc_info``.
    ``calibrations`` are the model's measured tolerances by profile
    (:func:`~corolla.node.verifier.read_calibrations`; none: the profiles' defaults), which the
    node applies as a verifier.
    """

    def __init__(
        self,
        span: Span,
        identity: Identity,
        config: ServiceConfig | None = None,
        behaviour: Behaviour | None = None,
        calibrations: Mapping[str, Calibration] | None = None,
    ) -> None:
        self.span = span
        self.identity = identity
        self.config = config or ServiceConfig()
        self.behaviour = behaviour or Behaviour()
        self.behaviour.attach(span)
        self.verifier = Verifier(identity, span, calibrations)
        self.unsigned = self.config.benchmark_unsigned
        self.sessions: SessionTable[Reply] = SessionTable(self.config.sessions)
        self.tickets = TicketBook(self.config.tickets)
        self.state = NodeState.JOINING
        self.throughput = 0.0
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        self.scheduler = PriorityScheduler(self.config.scheduler, self._compute)
        self._local_id: PeerID | None = None
        self._forwards: deque[float] = deque(maxlen=256)  # seconds of recent forward passes

    async def add_handlers(self, p2p: P2P) -> None:
        """Register the handlers under the protocol's names: ``rpc_info`` (unary) and
        ``rpc_forward`` (streamed) as hivemind protobuf handlers, inference streams as a raw
        stream handler."""
        self._local_id = p2p.peer_id
        await p2p.add_protobuf_handler(HANDLE_INFO, self.rpc_info, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(
            HANDLE_FORWARD,
            self.rpc_forward,
            runtime_pb2.ExpertRequest,
            stream_input=True,
            stream_output=True,
        )
        await p2p.add_binary_stream_handler(HANDLE_INFERENCE, self._serve_inference)

    async def remove_handlers(self, p2p: P2P) -> None:
        """Stop accepting requests (streams already open keep going until they end)."""
        await p2p.remove_protobuf_handler(HANDLE_INFO)
        await p2p.remove_protobuf_handler(HANDLE_FORWARD, stream_input=True, stream_output=True)
        await p2p.remove_binary_stream_handler(HANDLE_INFERENCE)

    def shutdown(self) -> None:
        """Refuse what is queued and stop the compute thread (call on the event loop)."""
        self.scheduler.close()
        self._compute.shutdown(wait=False, cancel_futures=True)

    @property
    def dtype_name(self) -> str:
        return str(self.span.dtype).removeprefix("torch.")

    def info(self, peer_id: str) -> NodeInfo:
        span = self.span
        return NodeInfo(
            peer_id=peer_id,
            public_key=self.identity.public_key,
            model_digest=span.model_digest,
            span_digest=span.digest,
            start=span.start,
            end=span.end,
            family=span.family.name,
            hidden_size=span.hidden_size,
            dtype=self.dtype_name,
            quant=span.quant,
            max_length=span.max_length,
            throughput=self.throughput,
            cache_tokens_total=self.sessions.config.max_cache_tokens,
            cache_tokens_free=self.sessions.free_tokens,
            sessions=len(self.sessions),
            state=self.state,
            version=__version__,
            queued_high=self.scheduler.queued(Priority.HIGH),
            queued_free=self.scheduler.queued(Priority.FREE),
            forward_us=round(1e6 * statistics.median(self._forwards)) if self._forwards else 0,
            overtaken=self.scheduler.overtaken,
            preempted=self.scheduler.preempted,
        )

    # ----------------------------------------------------------------------- RPCs

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        (part,) = encode_message(
            self.info(context.local_id.to_base58()).to_message(), runtime_pb2.ExpertResponse
        )
        return part

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        limits = self.config.limits
        try:
            async with asyncio.timeout(self.config.sessions.idle_timeout):
                frame = await receive_frame(requests, limits)
            if frame is None:
                return
            step = StepMessage.from_message(decode_frame(frame, limits), KIND_FORWARD)
            reply = (await self._forward(step)).to_message()
        except TimeoutError:
            reply = ErrorReply(ErrorCode.TIMEOUT, "no request arrived in time").to_message()
        except CorollaError as error:
            reply = _refusal(error, context)
        except Exception as error:
            logger.exception("rpc_forward failed")
            reply = ErrorReply.from_error(error).to_message()
        for part in encode_message(reply, runtime_pb2.ExpertResponse, limits.part_bytes):
            yield part
        # Give the client time to read the reply and hang up first (see linger); hivemind
        # cancels this wait when it does.
        await asyncio.sleep(LINGER_SECONDS)

    async def _serve_inference(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One inference stream (``rpc_inference``): each reply goes out in a single write."""
        context = P2PContext(HANDLE_INFERENCE, self._local_id, info.peer_id)
        limits = self.config.limits
        replies = self._inference(requests_from(reader), context)
        try:
            async for reply in replies:
                parts = encode_message(reply, runtime_pb2.ExpertResponse, limits.part_bytes)
                await write_parts(writer, parts)
        except (ConnectionError, OSError):
            pass  # the client hung up; the session is freed below
        finally:
            await replies.aclose()
            writer.close()

    async def _inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[Message]:
        """The replies to one stream's messages: open once, then steps, until the stream ends."""
        limits = self.config.limits
        idle = self.config.sessions.idle_timeout
        session: Session[Reply] | None = None
        try:
            while True:
                ending: ErrorReply | None = None
                try:
                    async with asyncio.timeout(idle):
                        frame = await receive_frame(requests, limits)
                except TimeoutError:
                    text = f"no message for {idle:g} s: session closed"
                    ending = ErrorReply(ErrorCode.TIMEOUT, text, fatal=True)
                except InvalidInput as error:
                    text = f"unreadable message, closing the stream: {error}"
                    ending = ErrorReply(ErrorCode.INVALID, text, fatal=True)
                else:
                    if frame is None:
                        return
                    try:
                        message = decode_frame(frame, limits)
                        if session is None:
                            session, note = self._open(message, context)
                            reply = _opened(session, note)
                        elif message.kind == KIND_CHECK:
                            reply = (await self._check(session, message)).to_message()
                        else:
                            reply = (await self._step(session, message)).to_message()
                    except CorollaError as error:
                        reply = _refusal(error, context)
                    except Exception as error:
                        # The span failed half-way: the cache can no longer be trusted.
                        logger.exception("inference step failed")
                        ending = ErrorReply.from_error(error, fatal=True)
                if ending is not None:
                    if session is not None:
                        self.sessions.close(session)
                    yield ending.to_message()
                    await linger(requests)
                    return
                yield reply
        finally:
            if session is not None:
                self.sessions.close(session)

    # ----------------------------------------------------------------------- steps

    def _open(self, message: Message, context: P2PContext) -> tuple[Session[Reply], str]:
        """Open the session ``message`` asks for; returns it and the note on its ticket."""
        if message.kind != KIND_OPEN:
            raise InvalidInput(f"unknown session: a {message.kind[:40]!r} before opening one")
        request = OpenSession.from_message(message)
        span = check_open(request, self.span)
        admission = self.tickets.admit(request.ticket, request.client_key)
        session = self.sessions.open(
            request.session_id,
            request.client_key,
            request.batch_size,
            request.max_length,
            span,
            admission.ticket,
        )
        if admission.note:
            logger.info("session from %s: %s", context.remote_id, admission.note)
        return session, admission.note

    async def _step(self, session: Session[Reply], message: Message) -> StepOutput:
        step = StepMessage.from_message(message)
        request, hidden = step.request, step.hidden
        if not self.unsigned:
            verify_request(request)
        check_session_owner(session, request)
        stored = session.replay_of(request)
        if stored is not None:
            if not isinstance(stored, StepOutput):
                raise InvalidInput(f"step {request.step} was a check step, not a plain one")
            return stored
        if session.mirror is not None:
            raise InvalidInput("this is a check session: it takes only check steps")
        batch, new = check_request(request, hidden, session.span)
        check_next_step(session, request, batch, new)
        compute = functools.partial(self._compute_step, request, hidden, session.span, session)
        reply = await self._session_step(session, request, compute)
        session.advance(request, reply, reply.receipt.chain_digest)
        return reply

    async def _check(self, session: Session[Reply], message: Message) -> CheckOutput:
        """A check step: the next step of this check session, compared with the checked node's
        claims (see :mod:`corolla.node.verifier`)."""
        if self.unsigned:
            raise InvalidInput("a node that checks no signatures does not verify other nodes")
        check = CheckMessage.from_message(message)
        request, hidden = check.request, check.hidden
        verify_request(request)
        check_session_owner(session, request)
        stored = session.replay_of(request)
        if stored is not None:
            if not isinstance(stored, CheckOutput):
                raise InvalidInput(f"step {request.step} was a plain step, not a check")
            return stored
        batch, new = check_request(request, hidden, session.span)
        check_next_step(session, request, batch, new)
        self.verifier.admit(session, check)
        compute = functools.partial(self._compute_check, check, session)
        reply = await self._session_step(session, request, compute)
        session.advance(request, reply, reply.receipt.chain_digest)
        session.mirror = self.verifier.mirror_after(check)
        return reply

    async def _session_step(
        self, session: Session[Reply], request: StepRequest, compute: functools.partial[Reply]
    ) -> Reply:
        """Run a session's step at the priority its ticket buys, charging the ticket."""
        admission = admit_step(session.ticket, request, self.tickets)
        if admission.drops_ticket:
            session.ticket = None
            logger.info("session %s: %s", session.session_id.hex(), admission.note)
        charged = admission.charged
        try:
            reply = await self.scheduler.run(
                admission.priority, compute, self._expected_seconds(request)
            )
        except BaseException:
            if charged is not None:  # not served: the ticket does not pay for it
                self.tickets.refund(charged, work_units(request))
            raise
        if charged is not None and not self.unsigned:
            self.tickets.record(charged, request, reply.receipt)
        if admission.note:
            reply = dataclasses.replace(reply, note=admission.note)
        return reply

    async def _forward(self, step: StepMessage) -> StepOutput:
        request, hidden = step.request, step.hidden
        if not self.unsigned:
            verify_request(request)
        span = requested_span(self.span, request.start, request.end)
        _, new = check_request(request, hidden, span)
        check_one_shot(request, new, span)
        compute = functools.partial(self._compute_step, request, hidden, span, None)
        return await self.scheduler.run(Priority.FREE, compute, self._expected_seconds(request))

    def _expected_seconds(self, request: StepRequest) -> float:
        """How long ``request`` should take, from the throughput measured at startup."""
        if self.throughput <= 0:
            return math.inf
        share = (request.end - request.start) / self.span.num_blocks
        return request.tokens * share / self.throughput

    def _compute_step(
        self,
        request: StepRequest,
        hidden: torch.Tensor,
        span: Span,
        session: Session[Reply] | None,
    ) -> StepOutput:
        """On the compute thread: a plain step."""
        receipt, _, sent = self._computed(request, hidden, span, session)
        return StepOutput(receipt, sent)

    def _compute_check(self, check: CheckMessage, session: Session[Reply]) -> CheckOutput:
        """On the compute thread: the claims' signatures and digests, the step, the verdict."""
        self.verifier.check_claims(check)
        receipt, output, sent = self._computed(check.request, check.hidden, session.span, session)
        try:
            verdict = self.behaviour.judge(
                self.identity, self.verifier.verdict(check, receipt, output)
            )
        except CorollaError as error:
            # The cache has advanced, the session has not: it cannot go on (the stream ends).
            raise RuntimeError(f"the verdict could not be made: {error}") from error
        return CheckOutput(receipt, sent, verdict)

    def _computed(
        self,
        request: StepRequest,
        hidden: torch.Tensor,
        span: Span,
        session: Session[Reply] | None,
    ) -> tuple[Receipt, torch.Tensor, torch.Tensor]:
        """Last input checks, the forward pass, the receipt: (receipt, the output it names, the
        tensor sent back)."""
        check_input(request, hidden)
        behaviour = self.behaviour
        scheduler = self.scheduler
        paused, started = scheduler.paused_seconds, time.perf_counter()
        cache = session.cache if session is not None else None
        computed = behaviour.compute(request, span, hidden, cache, scheduler.between_blocks)
        # Not counting the ticketed steps that ran inside this one, at its block boundaries.
        self._forwards.append(time.perf_counter() - started - (scheduler.paused_seconds - paused))
        output = behaviour.output(request.step, request, hidden, computed)
        previous = session.chain if session is not None else GENESIS_CHAIN
        receipt = behaviour.sign_receipt(self.identity, request, tensor_digest(output), previous)
        return receipt, output, behaviour.sent(request.step, request, output)


def _opened(session: Session[Reply], note: str) -> Message:
    return SessionOpened(
        session.session_id,
        session.batch_size,
        session.max_length,
        session.reserved_tokens,
        priority=opened_priority(session.ticket),
        note=note,
    ).to_message()


def _refusal(error: CorollaError, context: P2PContext) -> Message:
    logger.info("refused a request from %s: %s", context.remote_id, error)
    return ErrorReply.from_error(error).to_message()
