"""hivemind's stream framing, written whole and read with a bound, for inference streams.

On a libp2p stream hivemind frames each protobuf as a marker byte (``0`` message, ``1`` error),
an 8-byte big-endian length and the serialized bytes; an empty error is the end of a request
stream. Inference streams keep that format (any hivemind peer can read them) but not hivemind's
helpers, for two reasons measured on the hot path of generation:

- ``P2P.send_protobuf`` writes marker, length and body separately: three socket writes, each
  waking the libp2p daemon. :func:`write_parts` writes a whole message (all its parts) at once.
- ``P2P.receive_raw_data`` reads whatever length the peer announces. :func:`read_part` refuses a
  part over the message cap before reading it, so a peer cannot make a node buffer gigabytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as Protobuf
from hivemind.proto.p2pd_pb2 import RPCError

from corolla.errors import InvalidInput

__all__ = [
    "END_OF_STREAM",
    "ERROR_MARKER",
    "MESSAGE_MARKER",
    "StreamError",
    "pack_parts",
    "read_part",
    "write_parts",
]

MESSAGE_MARKER = b"\x00"
ERROR_MARKER = b"\x01"
_LENGTH_BYTES = 8
END_OF_STREAM = ERROR_MARKER + bytes(_LENGTH_BYTES)
"""An empty error: what a hivemind peer sends when it has no more requests."""

_Part = TypeVar("_Part", bound=Protobuf)


class StreamError(Exception):
    """The peer sent an error frame (hivemind's ``RPCError``) with this text."""


def pack_parts(parts: Sequence[Protobuf]) -> bytes:
    """The bytes of ``parts`` framed as hivemind frames them, one after another."""
    pieces: list[bytes] = []
    for part in parts:
        body = part.SerializeToString()
        pieces += [MESSAGE_MARKER, len(body).to_bytes(_LENGTH_BYTES, "big"), body]
    return b"".join(pieces)


async def write_parts(writer: asyncio.StreamWriter, parts: Sequence[Protobuf]) -> None:
    """Send ``parts`` in one write (one wake-up of the daemon), then wait for the buffer."""
    writer.write(pack_parts(parts))
    await writer.drain()


async def read_part(
    reader: asyncio.StreamReader, part_type: type[_Part], max_bytes: int
) -> _Part | None:
    """The next part, or ``None`` at the end of the stream (clean end or end-of-stream frame).

    Raises :class:`InvalidInput` for a frame that cannot be read (bad marker, a length over
    ``max_bytes``, undecodable bytes; the stream is then out of sync) and :class:`StreamError`
    for an error frame with a message.
    """
    try:
        marker = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return None
    if marker not in (MESSAGE_MARKER, ERROR_MARKER):
        raise InvalidInput(f"unknown frame marker {marker!r}")
    length = int.from_bytes(await reader.readexactly(_LENGTH_BYTES), "big")
    if length > max_bytes:
        raise InvalidInput(f"a frame of {length} bytes is over the limit of {max_bytes}")
    body = await reader.readexactly(length)
    try:
        if marker == ERROR_MARKER:
            error = RPCError.FromString(body)
            if not error.message:
                return None
            raise StreamError(error.message[:2000])
        return part_type.FromString(body)
    except DecodeError:
        raise InvalidInput("a frame's bytes do not decode") from None
