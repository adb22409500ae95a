"""The node wire protocol: messages, tensor (de)serialization, chunking, and a raw client.

Transport is hivemind P2P. A *message* is a kind, a body (a dict of the canonical data model of
:mod:`corolla.verify.encoding`) and a few tensors. On the wire one message is one or more
protobuf *parts* (``runtime_pb2.ExpertRequest`` from client to node, ``ExpertResponse`` back):

- part 0 carries ``metadata = canonical({"protocol", "kind", "parts", "body"})`` and the first
  tensor chunks; ``parts`` says how many parts the message has in all;
- parts 1.. carry only tensor chunks (empty metadata).

Tensors are hivemind ``runtime_pb2.Tensor`` with compression ``NONE``: raw native (little-endian)
bytes, ``size`` = shape, ``dtype`` = torch dtype name (bfloat16 as raw 2-byte values). A tensor
larger than a part is split with ``split_for_streaming`` (its head chunk says ``chunks = N``), so
no part exceeds :data:`PART_BYTES`, well under hivemind's 4 MiB message cap. Decoding is strict
(whitelisted dtypes, exact byte counts, bounded shapes and totals): hivemind's own deserializer
trusts the sender's dtype string and sizes, which a node cannot afford.

Receiving has two stages with different failure meanings:

- :func:`receive_frame` reads one message's parts. It raises :class:`InvalidInput` only when the
  framing itself is broken (undecodable envelope): the stream is out of sync and must be closed.
- :func:`decode_frame` turns a frame into a :class:`Message`. Its :class:`InvalidInput` (too many
  bytes, malformed tensor, wrong protocol version) is recoverable: the frame was consumed whole.

Typed messages (:class:`OpenSession`, :class:`SessionOpened`, :class:`StepMessage`,
:class:`StepOutput`, :class:`ErrorReply`, :class:`NodeInfo`) convert to and from
:class:`Message` and validate every field.

The raw client (:func:`request_info`, :func:`request_forward`, :class:`InferenceStream`,
:func:`read_reply`) lives in :mod:`corolla.node.protocol.stream`; its names are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from corolla.errors import CorollaError, InvalidInput, NodeBusy, NodeError, RemoteError
from corolla.verify.digests import DIGEST_SIZE
from corolla.verify.encoding import Value, canonical, decode
from corolla.verify.identity import PUBLIC_KEY_SIZE
from corolla.verify.receipts import SESSION_ID_SIZE, Receipt, StepRequest
from corolla.version import PROTOCOL_VERSION

__all__ = [
    "DTYPES",
    "HANDLE_FORWARD",
    "HANDLE_INFERENCE",
    "HANDLE_INFO",
    "KIND_ERROR",
    "KIND_FORWARD",
    "KIND_INFO",
    "KIND_OPEN",
    "KIND_OPENED",
    "KIND_OUTPUT",
    "KIND_STEP",
    "MESSAGE_CAP_BYTES",
    "NAMESPACE",
    "PART_BYTES",
    "PRIORITIES",
    "PRIORITY_FREE",
    "PRIORITY_HIGH",
    "SERVICE_NAME",
    "ErrorCode",
    "ErrorReply",
    "Frame",
    "Message",
    "NodeInfo",
    "OpenSession",
    "SessionOpened",
    "StepMessage",
    "StepOutput",
    "WireLimits",
    "decode_frame",
    "deserialize_tensor",
    "encode_message",
    "handle_name",
    "receive_frame",
    "serialize_tensor",
]

NAMESPACE = "corolla"
SERVICE_NAME = "NodeService"
MESSAGE_CAP_BYTES = 4 * 1024**2
"""hivemind refuses a single protobuf message larger than this."""
PART_BYTES = 1024**2
"""Most tensor bytes one part carries (a quarter of the cap, leaving room for framing)."""

KIND_OPEN = "open"
KIND_OPENED = "opened"
KIND_STEP = "step"
KIND_OUTPUT = "output"
KIND_FORWARD = "forward"
KIND_INFO = "info"
KIND_ERROR = "error"

PRIORITY_HIGH = "high"
"""A session whose ticket the node honours: its steps go ahead of free ones."""
PRIORITY_FREE = "free"
PRIORITIES = (PRIORITY_HIGH, PRIORITY_FREE)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}
"""The only dtypes the wire accepts, by their names in ``runtime_pb2.Tensor.dtype``."""


def handle_name(method: str) -> str:
    """The libp2p handler name of ``NodeService.<method>`` (as hivemind's ServicerBase names it)."""
    return f"{NAMESPACE}::{SERVICE_NAME}.{method}"


HANDLE_INFO = handle_name("rpc_info")
HANDLE_FORWARD = handle_name("rpc_forward")
HANDLE_INFERENCE = handle_name("rpc_inference")


@dataclass(frozen=True)
class WireLimits:
    """Bounds a receiver enforces on one message."""

    max_tensor_bytes: int = 64 * 1024**2
    max_metadata_bytes: int = 64 * 1024
    max_tensors: int = 4
    max_dims: int = 4
    part_bytes: int = PART_BYTES

    @property
    def max_parts(self) -> int:
        """Parts a message within the limits can need (every chunk could start a new part)."""
        return self.max_tensor_bytes // self.part_bytes + 2 * self.max_tensors + 1


@dataclass(frozen=True)
class Message:
    """One logical protocol message: a kind, a canonical body and tensors."""

    kind: str
    body: dict[str, Value] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()


# --------------------------------------------------------------------------- tensors


def serialize_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """A dense CPU tensor as an uncompressed ``runtime_pb2.Tensor`` (raw bytes)."""
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InvalidInput(f"dtype {name} cannot be sent; allowed: {', '.join(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=flat.view(torch.uint8).numpy().tobytes(),
        size=list(tensor.shape),
        dtype=name,
    )


def deserialize_tensor(proto: runtime_pb2.Tensor, limits: WireLimits) -> torch.Tensor:
    """The tensor in ``proto``, checked strictly; raises :class:`InvalidInput` on anything odd."""
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise InvalidInput("compressed tensors are not accepted")
    dtype = DTYPES.get(proto.dtype)
    if dtype is None:
        raise InvalidInput(f"dtype {proto.dtype[:40]!r} is not accepted; allowed: {list(DTYPES)}")
    shape = list(proto.size)
    if len(shape) > limits.max_dims:
        raise InvalidInput(f"a tensor has {len(shape)} dimensions; at most {limits.max_dims}")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(proto.buffer):
        raise InvalidInput(
            f"a {proto.dtype} tensor of shape {shape} needs {numel * itemsize} bytes, "
            f"got {len(proto.buffer)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(proto.buffer), dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------- framing

_Part = TypeVar("_Part", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def encode_message(
    message: Message, part_type: type[_Part], part_bytes: int = PART_BYTES
) -> list[_Part]:
    """Split ``message`` into protobuf parts of type ``part_type``, none over ``part_bytes``."""
    chunks: list[runtime_pb2.Tensor] = []
    for tensor in message.tensors:
        proto = serialize_tensor(tensor)
        if len(proto.buffer) > part_bytes:
            chunks.extend(split_for_streaming(proto, part_bytes))
        else:
            proto.chunks = 1
            chunks.append(proto)
    groups: list[list[runtime_pb2.Tensor]] = [[]]
    filled = 0
    for chunk in chunks:
        if groups[-1] and filled + len(chunk.buffer) > part_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(chunk)
        filled += len(chunk.buffer)
    envelope = {
        "protocol": PROTOCOL_VERSION,
        "kind": message.kind,
        "parts": len(groups),
        "body": message.body,
    }
    parts = [part_type(tensors=group) for group in groups]
    parts[0].metadata = canonical(envelope)
    return parts


@dataclass(frozen=True)
class Frame:
    """One received message before its tensors are decoded; ``problem`` marks a refusal."""

    protocol: int
    kind: str
    body: dict[str, Value]
    chunks: tuple[runtime_pb2.Tensor, ...]
    problem: str | None = None


async def receive_frame(
    parts: AsyncIterator[runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse],
    limits: WireLimits,
) -> Frame | None:
    """Read one message's parts from ``parts``; ``None`` when the stream ended cleanly.

    Raises :class:`InvalidInput` when the framing is broken (the stream must then be closed).
    Too many tensor bytes is not a framing error: the remaining parts are read and dropped, and
    the frame comes back with ``problem`` set.
    """
    first = await anext(parts, None)
    if first is None:
        return None
    if len(first.metadata) > limits.max_metadata_bytes:
        raise InvalidInput(f"message metadata over {limits.max_metadata_bytes} bytes")
    envelope = decode(first.metadata)
    if not isinstance(envelope, dict) or set(envelope) != {"protocol", "kind", "parts", "body"}:
        raise InvalidInput("message envelope must hold exactly protocol, kind, parts and body")
    count = envelope["parts"]
    if not _is_int(count) or not 1 <= count <= limits.max_parts:
        raise InvalidInput(f"a message must have 1..{limits.max_parts} parts, not {count!r}")
    protocol, kind, body = envelope["protocol"], envelope["kind"], envelope["body"]
    if not _is_int(protocol) or not isinstance(kind, str) or not isinstance(body, dict):
        raise InvalidInput("message envelope has a field of the wrong type")
    chunks = list(first.tensors)
    total = sum(len(chunk.buffer) for chunk in chunks)
    problem = None
    for index in range(1, count):
        part = await anext(parts, None)
        if part is None:
            raise InvalidInput(f"stream ended after {index} of {count} parts")
        if part.metadata:
            problem = "a continuation part carries metadata"
        total += sum(len(chunk.buffer) for chunk in part.tensors)
        if total > limits.max_tensor_bytes:
            problem = f"tensors over the limit of {limits.max_tensor_bytes} bytes"
            chunks.clear()
        elif problem is None:
            chunks.extend(part.tensors)
    if total > limits.max_tensor_bytes:
        problem = f"tensors over the limit of {limits.max_tensor_bytes} bytes"
        chunks.clear()
    return Frame(protocol, kind, body, tuple(chunks), problem)


def decode_frame(frame: Frame, limits: WireLimits) -> Message:
    """The :class:`Message` in ``frame``; raises :class:`InvalidInput` (recoverable) on errors."""
    if frame.problem is not None:
        raise InvalidInput(frame.problem)
    if frame.protocol != PROTOCOL_VERSION:
        raise InvalidInput(
            f"protocol version {frame.protocol} is not supported (this node speaks "
            f"{PROTOCOL_VERSION})"
        )
    tensors: list[torch.Tensor] = []
    index = 0
    chunks = frame.chunks
    while index < len(chunks):
        head = chunks[index]
        count = head.chunks
        if not head.dtype or not 1 <= count <= len(chunks) - index:
            raise InvalidInput(f"tensor chunk {index} is not a valid head chunk")
        if len(tensors) == limits.max_tensors:
            raise InvalidInput(f"a message may carry at most {limits.max_tensors} tensors")
        rest = chunks[index + 1 : index + count]
        if any(chunk.dtype or chunk.size or chunk.chunks for chunk in rest):
            raise InvalidInput(f"tensor {len(tensors)} has a malformed continuation chunk")
        whole = runtime_pb2.Tensor()
        whole.CopyFrom(head)
        whole.buffer = b"".join([head.buffer, *(chunk.buffer for chunk in rest)])
        tensors.append(deserialize_tensor(whole, limits))
        index += count
    return Message(frame.kind, frame.body, tuple(tensors))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- typed messages


class ErrorCode:
    """Why a node refused: ``busy`` becomes :class:`NodeBusy`, the rest :class:`RemoteError`."""

    BUSY = "busy"
    INVALID = "invalid"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    ALL = (BUSY, INVALID, TIMEOUT, INTERNAL)


_MAX_ERROR_TEXT = 2000
_MAX_TICKET_BYTES = 4096
_MAX_NAME = 200
_MAX_NOTE = 500


@dataclass(frozen=True)
class OpenSession:
    """Client -> node, first message of an inference stream: reserve a KV cache."""

    session_id: bytes
    batch_size: int
    max_length: int
    start: int
    end: int
    client_key: bytes
    ticket: bytes | None = None

    def __post_init__(self) -> None:
        _check_bytes("session_id", self.session_id, SESSION_ID_SIZE)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("max_length", self.max_length, 1)
        _check_int("start", self.start, 0)
        _check_int("end", self.end, self.start + 1)
        _check_bytes("client_key", self.client_key, PUBLIC_KEY_SIZE)
        if self.ticket is not None:
            _check_bytes("ticket", self.ticket, None, _MAX_TICKET_BYTES)

    def to_message(self) -> Message:
        return Message(KIND_OPEN, _fields_of(self))

    @classmethod
    def from_message(cls, message: Message) -> OpenSession:
        return cls(**_body(message, KIND_OPEN, cls.__dataclass_fields__, tensors=0))


@dataclass(frozen=True)
class SessionOpened:
    """Node -> client: the session is open and ``reserved_tokens`` of cache are held for it.

    ``priority`` is ``high`` when the node honours the session's ticket, else ``free``; ``note``
    says why (empty for a session opened without a ticket). Both may be absent from the body
    (a node of an earlier version): they then read as ``free`` and ``""``.
    """

    session_id: bytes
    batch_size: int
    max_length: int
    reserved_tokens: int
    priority: str = PRIORITY_FREE
    note: str = ""

    def __post_init__(self) -> None:
        _check_bytes("session_id", self.session_id, SESSION_ID_SIZE)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("max_length", self.max_length, 1)
        _check_int("reserved_tokens", self.reserved_tokens, 0)
        if self.priority not in PRIORITIES:
            raise InvalidInput(f"priority must be one of {PRIORITIES}, not {self.priority!r}"[:200])
        _check_note(self.note)

    def to_message(self) -> Message:
        return Message(KIND_OPENED, _fields_of(self))

    @classmethod
    def from_message(cls, message: Message) -> SessionOpened:
        required = ("session_id", "batch_size", "max_length", "reserved_tokens")
        body = _body(message, KIND_OPENED, required, tensors=0, optional=("priority", "note"))
        return cls(**body)


@dataclass(frozen=True)
class StepMessage:
    """Client -> node: a signed request and its hidden states [batch, tokens, hidden].

    Sent as kind ``step`` on an inference stream, or as kind ``forward`` to ``rpc_forward``.
    """

    request: StepRequest
    hidden: torch.Tensor

    def to_message(self, kind: str = KIND_STEP) -> Message:
        return Message(kind, {"request": self.request.to_bytes()}, (self.hidden,))

    @classmethod
    def from_message(cls, message: Message, kind: str = KIND_STEP) -> StepMessage:
        body = _body(message, kind, ["request"], tensors=1)
        return cls(StepRequest.from_bytes(body["request"]), message.tensors[0])


@dataclass(frozen=True)
class StepOutput:
    """Node -> client: the output hidden states and the node's signed receipt for them.

    ``note`` (sent only when not empty) tells the client something about the step that is not
    an error, e.g. that it ran at free priority because the session's ticket ran out.
    """

    receipt: Receipt
    hidden: torch.Tensor
    note: str = ""

    def __post_init__(self) -> None:
        _check_note(self.note)

    def to_message(self) -> Message:
        body: dict[str, Value] = {"receipt": self.receipt.to_bytes()}
        if self.note:
            body["note"] = self.note
        return Message(KIND_OUTPUT, body, (self.hidden,))

    @classmethod
    def from_message(cls, message: Message) -> StepOutput:
        body = _body(message, KIND_OUTPUT, ["receipt"], tensors=1, optional=("note",))
        return cls(Receipt.from_bytes(body["receipt"]), message.tensors[0], body.get("note", ""))


@dataclass(frozen=True)
class ErrorReply:
    """Node -> client: a refusal.

    If ``fatal`` is false the session (if any) is left as it was before the refused message and
    the stream stays open; if true the node frees the session and ends the stream.
    """

    code: str
    message: str
    step: int | None = None
    fatal: bool = False

    def __post_init__(self) -> None:
        if self.code not in ErrorCode.ALL:
            raise InvalidInput(f"unknown error code {str(self.code)[:40]!r}")
        if not isinstance(self.message, str):
            raise InvalidInput("error message must be a string")
        object.__setattr__(self, "message", self.message[:_MAX_ERROR_TEXT])
        if self.step is not None:
            _check_int("step", self.step, 0)
        if not isinstance(self.fatal, bool):
            raise InvalidInput("fatal must be a bool")

    def to_message(self) -> Message:
        return Message(KIND_ERROR, _fields_of(self))

    @classmethod
    def from_message(cls, message: Message) -> ErrorReply:
        return cls(**_body(message, KIND_ERROR, cls.__dataclass_fields__, tensors=0))

    @classmethod
    def from_error(
        cls, error: Exception, step: int | None = None, fatal: bool = False
    ) -> ErrorReply:
        """The reply for an error raised while serving a request."""
        if isinstance(error, NodeBusy):
            return cls(ErrorCode.BUSY, str(error), step, fatal)
        if isinstance(error, CorollaError):
            return cls(ErrorCode.INVALID, str(error), step, fatal)
        return cls(ErrorCode.INTERNAL, f"internal error: {type(error).__name__}", step, fatal)

    def to_exception(self, peer_id: str | None = None) -> NodeError:
        """:class:`NodeBusy` for ``busy``, otherwise :class:`RemoteError`."""
        where = f"node {peer_id}" if peer_id else "node"
        text = f"{where} refused ({self.code}): {self.message}"
        if self.code == ErrorCode.BUSY:
            return NodeBusy(text, peer_id)
        return RemoteError(text, peer_id)


@dataclass(frozen=True)
class NodeInfo:
    """Node -> client, answer to ``rpc_info``: what the node serves and how much room it has.

    Not signed: the DHT record (:mod:`corolla.node.protocol.records`) is the signed announcement;
    every activation is covered by a receipt signed with ``public_key``.
    """

    peer_id: str
    public_key: bytes
    model_digest: bytes
    span_digest: bytes
    start: int
    end: int
    family: str
    hidden_size: int
    dtype: str
    quant: str
    max_length: int
    throughput: float
    """Tokens per second through the whole span, measured at startup."""
    cache_tokens_total: int
    cache_tokens_free: int
    sessions: int
    state: str
    version: str
    protocol: int = PROTOCOL_VERSION
    queued_high: int = 0
    """Ticketed computations waiting in the node's queue (0 from nodes that do not say)."""
    queued_free: int = 0
    """Free computations waiting in the node's queue."""
    forward_us: int = 0
    """Median wall time of the node's recent forward passes, in microseconds (0: none yet)."""
    overtaken: int = 0
    """Computations that ticketed ones have overtaken since the node started."""
    preempted: int = 0
    """Times a free computation was paused between two blocks for ticketed ones."""

    def __post_init__(self) -> None:
        _check_str("peer_id", self.peer_id)
        _check_bytes("public_key", self.public_key, PUBLIC_KEY_SIZE)
        _check_bytes("model_digest", self.model_digest, DIGEST_SIZE)
        _check_bytes("span_digest", self.span_digest, DIGEST_SIZE)
        _check_int("start", self.start, 0)
        _check_int("end", self.end, self.start + 1)
        for name in ("family", "dtype", "quant", "state", "version"):
            _check_str(name, getattr(self, name))
        for name in ("hidden_size", "max_length"):
            _check_int(name, getattr(self, name), 1)
        for name in (
            "cache_tokens_total",
            "cache_tokens_free",
            "sessions",
            "protocol",
            "queued_high",
            "queued_free",
            "forward_us",
            "overtaken",
            "preempted",
        ):
            _check_int(name, getattr(self, name), 0)
        if not isinstance(self.throughput, float | int) or not 0 <= self.throughput < 1e12:
            raise InvalidInput(f"throughput must be a non-negative number, not {self.throughput!r}")

    def to_message(self) -> Message:
        body = _fields_of(self)
        body["throughput"] = milli(self.throughput)
        return Message(KIND_INFO, body)

    @classmethod
    def from_message(cls, message: Message) -> NodeInfo:
        names = set(cls.__dataclass_fields__) - _INFO_OPTIONAL
        fields = _body(message, KIND_INFO, names, tensors=0, optional=_INFO_OPTIONAL)
        _check_int("throughput", fields["throughput"], 0)
        fields["throughput"] = fields["throughput"] / 1000
        return cls(**fields)


_INFO_OPTIONAL = frozenset({"queued_high", "queued_free", "forward_us", "overtaken", "preempted"})


def milli(value: float) -> int:
    """A non-negative float as an int count of thousandths (canonical encoding has no floats)."""
    return round(value * 1000)


# --------------------------------------------------------------------------- field checks


def _check_int(name: str, value: object, low: int, high: int = 2**62) -> None:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise InvalidInput(f"{name} must be an int in [{low}, {high}], got {value!r}"[:300])


def _check_bytes(name: str, value: object, size: int | None, most: int | None = None) -> None:
    if not isinstance(value, bytes):
        raise InvalidInput(f"{name} must be bytes, not {type(value).__name__}")
    if size is not None and len(value) != size:
        raise InvalidInput(f"{name} must be {size} bytes, got {len(value)}")
    if most is not None and len(value) > most:
        raise InvalidInput(f"{name} is over {most} bytes")


def _check_note(value: object) -> None:
    if not isinstance(value, str) or len(value) > _MAX_NOTE:
        raise InvalidInput(f"note must be a string of at most {_MAX_NOTE} characters")


def _check_str(name: str, value: object, most: int = _MAX_NAME) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= most:
        raise InvalidInput(f"{name} must be a string of 1..{most} characters")


def _fields_of(record: object) -> dict[str, Value]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}  # type: ignore[attr-defined]


def _body(
    message: Message,
    kind: str,
    names: Iterable[str],
    tensors: int,
    optional: Iterable[str] = (),
) -> dict[str, Value]:
    """The body of a ``kind`` message with ``tensors`` tensors, every field of ``names`` and
    nothing but those and the ``optional`` ones."""
    names = set(names)
    allowed = names | set(optional)
    if message.kind != kind:
        raise InvalidInput(f"expected a {kind!r} message, got {message.kind[:40]!r}")
    if len(message.tensors) != tensors:
        raise InvalidInput(
            f"a {kind!r} message carries {tensors} tensors, not {len(message.tensors)}"
        )
    if not names <= set(message.body) <= allowed:
        if allowed == names:
            raise InvalidInput(f"a {kind!r} message must hold exactly the fields {sorted(names)}")
        raise InvalidInput(
            f"a {kind!r} message must hold the fields {sorted(names)}, and may hold "
            f"{sorted(allowed - names)}"
        )
    return dict(message.body)
