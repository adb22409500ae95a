"""Inference-stream framing: hivemind's format, written in one piece, read with a bound."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from corolla.errors import InvalidInput
from corolla.node.protocol.framing import END_OF_STREAM, StreamError, pack_parts, read_part


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _part(metadata: bytes) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid="x", metadata=metadata)


async def test_packed_parts_read_back_by_hivemind_and_by_read_part():
    parts = [_part(b"first"), _part(b"second" * 100)]
    data = pack_parts(parts)
    reader = _reader(data)
    for expected in parts:
        got, error = await P2P.receive_protobuf(runtime_pb2.ExpertRequest, reader)
        assert error is None and got == expected
    reader = _reader(data + END_OF_STREAM)
    assert await read_part(reader, runtime_pb2.ExpertRequest, 1 << 20) == parts[0]
    assert await read_part(reader, runtime_pb2.ExpertRequest, 1 << 20) == parts[1]
    assert await read_part(reader, runtime_pb2.ExpertRequest, 1 << 20) is None


async def test_a_frame_over_the_limit_is_refused_before_it_is_read():
    huge_length = b"\x00" + (2**40).to_bytes(8, "big")  # announces a terabyte, sends nothing
    with pytest.raises(InvalidInput, match="over the limit"):
        await read_part(_reader(huge_length), runtime_pb2.ExpertRequest, 4 << 20)


async def test_unknown_markers_and_undecodable_bytes_are_invalid_input():
    with pytest.raises(InvalidInput, match="marker"):
        await read_part(_reader(b"\x07" + bytes(8)), runtime_pb2.ExpertRequest, 1024)
    garbage = b"\xff\xff\xff"
    framed = b"\x00" + len(garbage).to_bytes(8, "big") + garbage
    with pytest.raises(InvalidInput, match="decode"):
        await read_part(_reader(framed), runtime_pb2.ExpertRequest, 1024)


async def test_an_error_frame_raises_its_text_and_a_clean_end_is_none():
    body = RPCError(message="node refused").SerializeToString()
    framed = b"\x01" + len(body).to_bytes(8, "big") + body
    with pytest.raises(StreamError, match="node refused"):
        await read_part(_reader(framed), runtime_pb2.ExpertRequest, 1024)
    assert await read_part(_reader(b""), runtime_pb2.ExpertRequest, 1024) is None


async def test_a_stream_cut_inside_a_frame_raises_incomplete_read():
    framed = pack_parts([_part(b"cut short")])
    with pytest.raises(asyncio.IncompleteReadError):
        await read_part(_reader(framed[:-3]), runtime_pb2.ExpertRequest, 1024)
