"""The node's end of a raw inference stream: its request parts, and a linger before closing.

hivemind's protobuf handlers read requests for a servicer; an inference stream is a raw libp2p
stream instead (see :mod:`corolla.node.protocol.framing`), so the node reads its parts itself
with a bound, and decides itself when to close it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from hivemind.proto import runtime_pb2

from corolla.node.protocol.framing import StreamError, read_part
from corolla.node.protocol.tensors import MESSAGE_CAP_BYTES

__all__ = ["LINGER_SECONDS", "linger", "requests_from"]

LINGER_SECONDS = 5.0
"""Most seconds a node waits for the client to hang up after the last reply of a stream."""


async def requests_from(reader: asyncio.StreamReader) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """The request parts of a raw stream until it ends (a hang-up mid-frame is an end too)."""
    while True:
        try:
            part = await read_part(reader, runtime_pb2.ExpertRequest, MESSAGE_CAP_BYTES)
        except (asyncio.IncompleteReadError, ConnectionError, StreamError):
            return
        if part is None:
            return
        yield part


async def linger(requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
    """Before ending a stream right after a reply, give the client time to read it and hang up.

    The libp2p daemon can drop the last message of a stream closed at once after writing it
    (seen about once in 200 one-shot calls, more often on a busy machine); the client closing
    first avoids that. On a raw stream the requests end when the client hangs up (anything it
    still sends is dropped); the wait ends then, or after :data:`LINGER_SECONDS`. (On hivemind's
    protobuf handlers the requests end with a marker the client sends right after its request,
    before it has the reply, so ``rpc_forward`` sleeps instead and hivemind cancels the sleep
    when the client hangs up.)
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            async for _ in requests:
                pass
