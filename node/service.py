"""The node's RPC service: inference streams, one-shot forwards and info, over hivemind P2P.

Every message is untrusted. A step is checked before anything is computed, in this order:
message shape and fields; the client's signature; model, span, session and client key; step
order (a retry of the last step gets its stored reply back); hidden states' dtype and shape
[batch, tokens, hidden]; ``tokens``; ``position``; room left in the session; then, on the
compute thread, the input digest and finiteness. Any failure is answered with an error message
and leaves the session as it was; only a broken framing (the stream is out of sync), an idle
timeout or an internal failure of the span ends the stream. Compute runs on one worker thread so
the event loop keeps serving other peers.

Every computation (inference steps and one-shot forwards) waits its turn in one
:class:`~corolla.node.scheduler.PriorityScheduler`: steps of sessions whose ticket the node honours
(:mod:`corolla.node.ticket_book`) run at high priority, everything else free; a full queue is a
``busy`` refusal that leaves the session as it was. A ticket is checked at ``open`` (the reply says
``high`` or ``free`` and why) and charged per step; a ticket that is not honoured, or runs out,
never fails a step: the step runs free and its reply carries a note. Charged steps' (request,
receipt) pairs wait in the ticket book for :mod:`corolla.node.settlement` to redeem them.

What a node does with a step goes through a :class:`~corolla.node.behaviour.Behaviour` (honest
by default; re-exported here): :mod:`corolla.simulations.adversaries` supplies dishonest ones.

``ServiceConfig.benchmark_unsigned`` (set by the node process when ``COROLLA_BENCHMARK_UNSIGNED=1``)
exists only for ``benchmarks/swarm_generation.py``, to measure what signatures cost: the node then
checks no client signature and signs its receipts with 64 zero bytes, which every normal client
rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# hivemind's ServicerBase recognises streams only by typing's alias, not collections.abc's.
from typing import AsyncIterator  # noqa: UP035

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from corolla.errors import CorollaError, InvalidInput
from corolla.node.behaviour import BENCHMARK_UNSIGNED_ENV, Behaviour, unsigned_signer
from corolla.node.model.span import Span
from corolla.node.protocol.framing import StreamError, read_part, write_parts
from corolla.node.protocol.messages import (
    HANDLE_INFERENCE,
    KIND_FORWARD,
    KIND_OPEN,
    MESSAGE_CAP_BYTES,
    NAMESPACE,
    PRIORITY_FREE,
    PRIORITY_HIGH,
    SERVICE_NAME,
    ErrorCode,
    ErrorReply,
    Message,
    NodeInfo,
    OpenSession,
    SessionOpened,
    StepMessage,
    StepOutput,
    WireLimits,
    decode_frame,
    encode_message,
    receive_frame,
)
from corolla.node.protocol.records import NodeState
from corolla.node.scheduler import Priority, PriorityScheduler, SchedulerConfig
from corolla.node.sessions import Session, SessionConfig, SessionTable
from corolla.node.ticket_book import HonouredTicket, TicketBook, TicketConfig
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import StepRequest, verify_request, work_units
from corolla.version import PROTOCOL_VERSION, __version__

__all__ = ["BENCHMARK_UNSIGNED_ENV", "Behaviour", "NodeService", "ServiceConfig"]

logger = logging.getLogger("corolla.node")
LINGER_SECONDS = 5.0


@dataclass(frozen=True)
class ServiceConfig:
    """Limits of the service: per message (wire), per node (sessions, queue), and tickets."""

    limits: WireLimits = field(default_factory=WireLimits)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tickets: TicketConfig = field(default_factory=TicketConfig)
    benchmark_unsigned: bool = False
    """Benchmarks only: skip the clients' signatures, sign receipts with zeros."""


class NodeService(ServicerBase):
    """RPC handlers of a node serving one span. Register with ``add_p2p_handlers(p2p, ...)``.

    ``state`` and ``throughput`` are set by the server process and reported by ``rpc_info``.
    """

    def __init__(
        self,
        span: Span,
        identity: Identity,
        config: ServiceConfig | None = None,
        behaviour: Behaviour | None = None,
    ) -> None:
        self.span = span
        self.identity = identity
        self.config = config or ServiceConfig()
        self.behaviour = behaviour or Behaviour()
        self.behaviour.attach(span)
        self.unsigned = self.config.benchmark_unsigned
        self._signer = unsigned_signer(identity) if self.unsigned else identity
        self.sessions: SessionTable[StepOutput] = SessionTable(self.config.sessions)
        self.tickets = TicketBook(self.config.tickets)
        self.state = NodeState.JOINING
        self.throughput = 0.0
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        self.scheduler = PriorityScheduler(self.config.scheduler, self._compute)
        self._local_id: PeerID | None = None
        self._forwards: deque[float] = deque(maxlen=256)  # seconds of recent forward passes

    async def add_handlers(self, p2p: P2P) -> None:
        """Register the handlers: ``rpc_info``/``rpc_forward`` as hivemind protobuf handlers
        under the protocol's namespace, inference streams as a raw stream handler."""
        if type(self).__name__ != SERVICE_NAME:
            raise InvalidInput(f"the service class must be named {SERVICE_NAME}")
        self._local_id = p2p.peer_id
        await self.add_p2p_handlers(p2p, namespace=NAMESPACE)
        await p2p.add_binary_stream_handler(HANDLE_INFERENCE, self._serve_inference)

    async def remove_handlers(self, p2p: P2P) -> None:
        """Stop accepting requests (streams already open keep going until they end)."""
        await self.remove_p2p_handlers(p2p, namespace=NAMESPACE)
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
        # Give the client time to read the reply and hang up first (see _linger); hivemind
        # cancels this wait when it does.
        await asyncio.sleep(LINGER_SECONDS)

    async def _serve_inference(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One inference stream (``rpc_inference``): each reply goes out in a single write."""
        context = P2PContext(HANDLE_INFERENCE, self._local_id, info.peer_id)
        limits = self.config.limits
        replies = self._inference(_requests_from(reader), context)
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
        session: Session[StepOutput] | None = None
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
                    await _linger(requests)
                    return
                yield reply
        finally:
            if session is not None:
                self.sessions.close(session)

    # ----------------------------------------------------------------------- steps

    def _open(self, message: Message, context: P2PContext) -> tuple[Session[StepOutput], str]:
        """Open the session ``message`` asks for; returns it and the note on its ticket."""
        if message.kind != KIND_OPEN:
            raise InvalidInput(f"unknown session: a {message.kind[:40]!r} before opening one")
        request = OpenSession.from_message(message)
        span = self._subspan(request.start, request.end)
        if request.max_length > span.max_length:
            raise InvalidInput(
                f"max_length {request.max_length} exceeds the model's {span.max_length}"
            )
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

    def _subspan(self, start: int, end: int) -> Span:
        """The node's span, or the part of it a client asks for."""
        span = self.span
        if not span.start <= start < end <= span.end:
            raise InvalidInput(
                f"this node serves blocks [{span.start}, {span.end}), not [{start}, {end})"
            )
        return span.subspan(start, end)

    def _check_request(
        self, request: StepRequest, hidden: torch.Tensor, span: Span
    ) -> tuple[int, int]:
        """Checks of a request against the blocks it runs; returns (batch, tokens per sequence)."""
        if request.protocol_version != PROTOCOL_VERSION:
            raise InvalidInput(f"protocol version {request.protocol_version} is not supported")
        if request.model_digest != span.model_digest:
            raise InvalidInput("the request names another model than this node serves")
        if (request.start, request.end) != (span.start, span.end):
            raise InvalidInput(f"the request names blocks other than [{span.start}, {span.end})")
        if request.span_digest != span.digest:
            raise InvalidInput("the request's span digest differs from this node's span")
        span.check_hidden(hidden)
        batch, new = hidden.shape[0], hidden.shape[1]
        if request.tokens != batch * new:
            raise InvalidInput(
                f"request claims {request.tokens} tokens, hidden states hold {batch * new}"
            )
        return batch, new

    async def _step(self, session: Session[StepOutput], message: Message) -> StepOutput:
        step = StepMessage.from_message(message)
        request, hidden = step.request, step.hidden
        if not self.unsigned:
            verify_request(request)
        if request.session_id != session.session_id:
            raise InvalidInput(
                "unknown session: the request names a session not open on this stream"
            )
        if request.client_key != session.client_key:
            raise InvalidInput("the request is signed by another client than the session's")
        stored = session.replay_of(request)
        if stored is not None:
            return stored
        batch, new = self._check_request(request, hidden, session.span)
        if batch != session.batch_size:
            raise InvalidInput(f"batch of {batch} sent to a session of batch {session.batch_size}")
        if request.position != session.position:
            raise InvalidInput(
                f"request is at position {request.position}, the session at {session.position}"
            )
        if session.past_length + new > session.max_length:
            raise InvalidInput(
                f"{session.past_length} + {new} tokens exceed the session's max length "
                f"of {session.max_length}"
            )
        priority, honoured, note = self._priority_of(session, request)
        try:
            reply = await self._run(request, hidden, session.span, session, priority)
        except BaseException:
            if honoured is not None:  # not served: the ticket does not pay for it
                self.tickets.refund(honoured, work_units(request))
            raise
        if honoured is not None and not self.unsigned:
            self.tickets.record(honoured, request, reply.receipt)
        if note:
            reply = dataclasses.replace(reply, note=note)
        session.advance(request, reply, reply.receipt.chain_digest)
        return reply

    def _priority_of(
        self, session: Session[StepOutput], request: StepRequest
    ) -> tuple[Priority, HonouredTicket | None, str]:
        """The class a session's step runs in, the ticket charged for it, and a note if free
        against the session's wishes. A ticket that cannot pay never fails the step."""
        honoured = session.ticket
        if honoured is None:
            return Priority.FREE, None, ""
        if request.ticket_digest != honoured.digest:
            note = "the request does not name the session's ticket: this step ran at free priority"
            return Priority.FREE, None, note
        problem = self.tickets.charge(honoured, work_units(request))
        if problem is not None:
            session.ticket = None
            logger.info("session %s drops to free priority: %s", session.session_id.hex(), problem)
            return Priority.FREE, None, f"{problem}: the session runs at free priority from now on"
        return Priority.HIGH, honoured, ""

    async def _forward(self, step: StepMessage) -> StepOutput:
        request, hidden = step.request, step.hidden
        if not self.unsigned:
            verify_request(request)
        span = self._subspan(request.start, request.end)
        _, new = self._check_request(request, hidden, span)
        if request.position != 0:
            raise InvalidInput("a one-shot forward starts at position 0")
        if new > span.max_length:
            raise InvalidInput(f"{new} tokens exceed the model's context of {span.max_length}")
        return await self._run(request, hidden, span, None, Priority.FREE)

    async def _run(
        self,
        request: StepRequest,
        hidden: torch.Tensor,
        span: Span,
        session: Session[StepOutput] | None,
        priority: Priority,
    ) -> StepOutput:
        """Queue the computation in its class; NodeBusy at once if the queue has no room."""
        compute = functools.partial(self._compute_step, request, hidden, span, session)
        return await self.scheduler.run(priority, compute, self._expected_seconds(request))

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
        session: Session[StepOutput] | None,
    ) -> StepOutput:
        """On the compute thread: last input checks, the forward pass, the receipt."""
        if tensor_digest(hidden) != request.input_digest:
            raise InvalidInput("the hidden states do not match the request's input digest")
        if not bool(torch.isfinite(hidden).all()):
            raise InvalidInput("the hidden states contain NaN or infinity")
        behaviour = self.behaviour
        scheduler = self.scheduler
        paused, started = scheduler.paused_seconds, time.perf_counter()
        cache = session.cache if session is not None else None
        computed = behaviour.compute(request, span, hidden, cache, scheduler.between_blocks)
        # Not counting the ticketed steps that ran inside this one, at its block boundaries.
        self._forwards.append(time.perf_counter() - started - (scheduler.paused_seconds - paused))
        output = behaviour.output(request.step, request, hidden, computed)
        previous = session.chain if session is not None else GENESIS_CHAIN
        receipt = behaviour.sign_receipt(self._signer, request, tensor_digest(output), previous)
        return StepOutput(receipt, behaviour.sent(request.step, request, output))


def _opened(session: Session[StepOutput], note: str) -> Message:
    return SessionOpened(
        session.session_id,
        session.batch_size,
        session.max_length,
        session.reserved_tokens,
        priority=PRIORITY_HIGH if session.ticket is not None else PRIORITY_FREE,
        note=note,
    ).to_message()


def _refusal(error: CorollaError, context: P2PContext) -> Message:
    logger.info("refused a request from %s: %s", context.remote_id, error)
    return ErrorReply.from_error(error).to_message()


async def _linger(requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
    """Before ending a stream right after a reply, give the client time to read it and hang up.

    The libp2p daemon can drop the last message of a stream closed at once after writing it
    (seen about once in 200 one-shot calls, more often on a busy machine); the client closing
    first avoids that. On a raw stream the requests end when the client hangs up (anything it
    still sends is dropped); the wait ends then, or after ``LINGER_SECONDS``. (On hivemind's
    protobuf handlers the requests end with a marker the client sends right after its request,
    before it has the reply, so ``rpc_forward`` sleeps instead and hivemind cancels the sleep
    when the client hangs up.)
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            async for _ in requests:
                pass


async def _requests_from(reader: asyncio.StreamReader) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """The request parts of a raw stream until it ends (a hang-up mid-frame is an end too)."""
    while True:
        try:
            part = await read_part(reader, runtime_pb2.ExpertRequest, MESSAGE_CAP_BYTES)
        except (asyncio.IncompleteReadError, ConnectionError, StreamError):
            return
        if part is None:
            return
        yield part
