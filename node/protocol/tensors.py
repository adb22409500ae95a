"""How a message travels: its tensors' strict encoding, chunking into parts, and reassembly.

A :class:`Message` is a kind, a body (a dict of the canonical data model of
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
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from corolla.errors import InvalidInput
from corolla.verify.encoding import Value, canonical, decode
from corolla.version import PROTOCOL_VERSION

__all__ = [
    "DTYPES",
    "MESSAGE_CAP_BYTES",
    "PART_BYTES",
    "Frame",
    "Message",
    "WireLimits",
    "decode_frame",
    "deserialize_tensor",
    "encode_message",
    "receive_frame",
    "serialize_tensor",
]

MESSAGE_CAP_BYTES = 4 * 1024**2
"""hivemind refuses a single protobuf message larger than this."""
PART_BYTES = 1024**2
"""Most tensor bytes one part carries (a quarter of the cap, leaving room for framing)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}
"""The only dtypes the wire accepts, by their names in ``runtime_pb2.Tensor.dtype``."""


@dataclass(frozen=True)
class WireLimits:
    """Bounds a receiver enforces on one message."""

    max_tensor_bytes: int = 64 * 1024**2
    max_metadata_bytes: int = 512 * 1024
    """Part 0's canonical envelope: a check step's records (about 1.3 KB per covered step, at
    most ``MAX_CHECK_STEPS``) must fit, and part 0 stays far under hivemind's cap."""
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


# --------------------------------------------------------------------------- one tensor


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


# --------------------------------------------------------------------------- a message's parts

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
