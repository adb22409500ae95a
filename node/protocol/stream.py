"""The raw client of the node wire protocol: ``rpc_info``, ``rpc_forward`` and inference streams.

What a caller sees: :class:`~corolla.errors.NodeBusy` (the node refused for capacity, the stream
is still usable), :class:`~corolla.errors.RemoteError` (the node refused the message or sent a
malformed reply; the stream is still usable unless the node ended it) and
:class:`~corolla.errors.NodeUnavailable` (timeout, dropped stream, unreachable: the stream is
dead). Messages are in :mod:`corolla.node.protocol.messages`, their parts and limits in
:mod:`corolla.node.protocol.tensors`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import NoReturn, TypeVar

from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from corolla.errors import InvalidInput, NodeUnavailable, RemoteError
from corolla.node.protocol.framing import END_OF_STREAM, StreamError, read_part, write_parts
from corolla.node.protocol.messages import (
    HANDLE_FORWARD,
    HANDLE_INFERENCE,
    HANDLE_INFO,
    KIND_CHECKED,
    KIND_ERROR,
    KIND_FORWARD,
    KIND_INFO,
    KIND_STEP,
    CheckMessage,
    CheckOutput,
    ErrorReply,
    NodeInfo,
    OpenSession,
    SessionOpened,
    StepMessage,
    StepOutput,
)
from corolla.node.protocol.tensors import (
    MESSAGE_CAP_BYTES,
    Message,
    WireLimits,
    decode_frame,
    encode_message,
    receive_frame,
)

__all__ = ["InferenceStream", "read_reply", "request_forward", "request_info"]

_Item = TypeVar("_Item")
_DEFAULT_LIMITS = WireLimits()

_TRANSPORT_ERRORS = (
    P2PDaemonError,
    ConnectionError,
    OSError,
    asyncio.IncompleteReadError,
    EOFError,
)


async def request_info(
    p2p: P2P, peer_id: PeerID, *, timeout: float = 10.0, limits: WireLimits = _DEFAULT_LIMITS
) -> NodeInfo:
    """Ask a node what it serves (unary ``rpc_info``)."""
    (part,) = encode_message(Message(KIND_INFO), runtime_pb2.ExpertRequest)
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer_id, HANDLE_INFO, part, runtime_pb2.ExpertResponse),
            timeout,
        )
    except P2PHandlerError as error:
        raise RemoteError(f"node {peer_id} failed rpc_info: {error}", str(peer_id)) from None
    except (TimeoutError, *_TRANSPORT_ERRORS) as error:
        raise NodeUnavailable(
            f"node {peer_id} did not answer rpc_info: {error!r}", str(peer_id)
        ) from None
    message = await read_reply(_aiter_of([response]), limits, peer_id)
    return NodeInfo.from_message(message)


async def request_forward(
    p2p: P2P,
    peer_id: PeerID,
    step: StepMessage,
    *,
    timeout: float = 60.0,
    limits: WireLimits = _DEFAULT_LIMITS,
) -> StepOutput:
    """One-shot forward of a whole sequence (``rpc_forward``); no session is kept."""
    parts = encode_message(step.to_message(KIND_FORWARD), runtime_pb2.ExpertRequest)
    try:
        async with asyncio.timeout(timeout):
            responses = await p2p.iterate_protobuf_handler(
                peer_id, HANDLE_FORWARD, _aiter_of(parts), runtime_pb2.ExpertResponse
            )
            try:
                message = await read_reply(responses, limits, peer_id)
            finally:
                with contextlib.suppress(Exception):
                    await responses.aclose()  # type: ignore[attr-defined]
    except TimeoutError:
        raise NodeUnavailable(
            f"node {peer_id} did not answer rpc_forward in {timeout} s", str(peer_id)
        ) from None
    except _TRANSPORT_ERRORS as error:
        raise NodeUnavailable(
            f"node {peer_id} failed rpc_forward: {error!r}", str(peer_id)
        ) from None
    return StepOutput.from_message(message)


class InferenceStream:
    """The client end of one ``rpc_inference`` stream: one session on one node.

    ``open`` then ``step`` repeatedly (or ``check`` on a verifier's check session, see
    :class:`~corolla.node.protocol.messages.CheckMessage`); ``close`` ends the stream (the node
    frees the session).
    The lower-level ``send``/``send_parts``/``receive`` exist for tests that send malformed data.
    After a timeout or a transport error the stream is dead and every call raises
    :class:`NodeUnavailable`; an :class:`ErrorReply` raises :class:`NodeBusy`/:class:`RemoteError`
    and leaves the stream usable (unless the node chose to end it).

    Built on the raw libp2p stream (hivemind's framing, no background writer task), so a node
    that ends the stream is noticed at once.
    """

    def __init__(self, p2p: P2P, peer_id: PeerID, limits: WireLimits = _DEFAULT_LIMITS) -> None:
        self.p2p = p2p
        self.peer_id = peer_id
        self.limits = limits
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parts: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self._dead: str | None = None

    @property
    def alive(self) -> bool:
        return self._dead is None

    async def _connect(self) -> None:
        if self._dead is not None:
            raise NodeUnavailable(self._dead, str(self.peer_id))
        if self._writer is None:
            try:
                _, self._reader, self._writer = await self.p2p.call_binary_stream_handler(
                    self.peer_id, HANDLE_INFERENCE
                )
            except (*_TRANSPORT_ERRORS, Exception) as error:
                self._dead = f"cannot reach node {self.peer_id}: {error!r}"
                raise NodeUnavailable(self._dead, str(self.peer_id)) from None
            self._parts = self._read_parts(self._reader)

    @staticmethod
    async def _read_parts(
        reader: asyncio.StreamReader,
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        while True:
            try:
                part = await read_part(reader, runtime_pb2.ExpertResponse, MESSAGE_CAP_BYTES)
            except StreamError as error:
                raise P2PHandlerError(str(error)) from None
            if part is None:
                return
            yield part

    async def send_parts(self, parts: Sequence[runtime_pb2.ExpertRequest]) -> None:
        """Send protobuf parts in one write (tests use it to send malformed input)."""
        await self._connect()
        try:
            await write_parts(self._writer, parts)  # type: ignore[arg-type]
        except (*_TRANSPORT_ERRORS, RuntimeError) as error:
            await self._die(f"stream to node {self.peer_id} broke: {error!r}")

    async def send(self, message: Message) -> None:
        await self.send_parts(encode_message(message, runtime_pb2.ExpertRequest))

    async def receive(self, timeout: float) -> Message:
        """The next message from the node, decoded; an :class:`ErrorReply` is raised."""
        await self._connect()
        try:
            async with asyncio.timeout(timeout):
                message = await _read_message(self._parts, self.limits, self.peer_id)  # type: ignore[arg-type]
        except TimeoutError:
            reason = f"node {self.peer_id} did not answer within {timeout} s"
        except NodeUnavailable as error:
            reason = str(error)
        except (*_TRANSPORT_ERRORS, TypeError, ValueError) as error:
            reason = f"stream to node {self.peer_id} broke: {error!r}"
        else:
            if message.kind != KIND_ERROR:
                return message
            reply = _error_reply(message, self.peer_id)
            if reply.fatal:  # the node has ended the stream: let it go at once
                self._dead = f"node {self.peer_id} ended the stream: {reply.message}"
                await self.abort()
            raise reply.to_exception(str(self.peer_id))
        await self._die(reason)

    async def open(self, request: OpenSession, timeout: float = 30.0) -> SessionOpened:
        await self.send(request.to_message())
        return SessionOpened.from_message(await self.receive(timeout))

    async def step(self, step: StepMessage, timeout: float = 60.0) -> StepOutput:
        await self.send(step.to_message(KIND_STEP))
        return StepOutput.from_message(await self.receive(timeout))

    async def check(self, check: CheckMessage, timeout: float = 60.0) -> CheckOutput:
        """Send a check step to a verifier; its recomputation, receipt and signed verdict."""
        await self.send(check.to_message())
        message = await self.receive(timeout)
        if message.kind != KIND_CHECKED:
            raise RemoteError(
                f"node {self.peer_id} answered a check with a {message.kind[:40]!r} message",
                str(self.peer_id),
            )
        try:
            return CheckOutput.from_message(message)
        except InvalidInput as error:
            raise RemoteError(
                f"node {self.peer_id} sent a malformed check output: {error}", str(self.peer_id)
            ) from None

    async def close(self, timeout: float = 5.0) -> None:
        """End the stream politely: the node frees the session and ends its side."""
        if self._writer is not None and self._dead is None:
            with contextlib.suppress(Exception):
                self._writer.write(END_OF_STREAM)
                async with asyncio.timeout(timeout):
                    async for _ in self._parts:  # type: ignore[union-attr]
                        pass
        self._dead = self._dead or "stream closed"
        await self.abort()

    async def abort(self) -> None:
        """Drop the connection at once (the node sees a dropped stream)."""
        self._dead = self._dead or "stream aborted"
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _die(self, reason: str) -> NoReturn:
        self._dead = reason
        await self.abort()
        raise NodeUnavailable(reason, str(self.peer_id))

    async def __aenter__(self) -> InferenceStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def read_reply(
    responses: AsyncIterator[runtime_pb2.ExpertResponse], limits: WireLimits, peer_id: PeerID
) -> Message:
    """One reply from a node, decoded; its :class:`ErrorReply` is raised as an exception.

    A malformed reply raises :class:`RemoteError`, an ended stream :class:`NodeUnavailable`.
    """
    message = await _read_message(responses, limits, peer_id)
    if message.kind == KIND_ERROR:
        raise _error_reply(message, peer_id).to_exception(str(peer_id))
    return message


async def _read_message(
    responses: AsyncIterator[runtime_pb2.ExpertResponse], limits: WireLimits, peer_id: PeerID
) -> Message:
    try:
        frame = await receive_frame(responses, limits)
    except P2PHandlerError as error:
        raise RemoteError(f"node {peer_id} failed: {error}", str(peer_id)) from None
    except InvalidInput as error:
        raise RemoteError(f"node {peer_id} sent a malformed reply: {error}", str(peer_id)) from None
    if frame is None:
        raise NodeUnavailable(f"node {peer_id} ended the stream", str(peer_id))
    try:
        return decode_frame(frame, limits)
    except InvalidInput as error:
        raise RemoteError(f"node {peer_id} sent a malformed reply: {error}", str(peer_id)) from None


def _error_reply(message: Message, peer_id: PeerID) -> ErrorReply:
    try:
        return ErrorReply.from_message(message)
    except InvalidInput as error:
        raise RemoteError(f"node {peer_id} sent a malformed error: {error}", str(peer_id)) from None


async def _aiter_of(items: Iterable[_Item]) -> AsyncIterator[_Item]:
    for item in items:
        yield item
