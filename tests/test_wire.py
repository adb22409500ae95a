"""The node wire format: tensors, chunked messages, typed messages and their validation."""

from __future__ import annotations

import os

import pytest
import torch
from hivemind.proto import runtime_pb2

from corolla.errors import InvalidInput, NodeBusy, RemoteError
from corolla.node.protocol.messages import (
    ErrorCode,
    ErrorReply,
    NodeInfo,
    OpenSession,
    SessionOpened,
    StepMessage,
    StepOutput,
)
from corolla.node.protocol.tensors import (
    MESSAGE_CAP_BYTES,
    PART_BYTES,
    Message,
    WireLimits,
    decode_frame,
    deserialize_tensor,
    encode_message,
    receive_frame,
    serialize_tensor,
)
from corolla.verify.digests import tensor_digest
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity
from corolla.verify.receipts import make_receipt, sign_request
from corolla.version import PROTOCOL_VERSION

LIMITS = WireLimits()


async def _stream(parts):
    for part in parts:
        yield part


async def _round_trip(message: Message, limits: WireLimits = LIMITS) -> Message:
    parts = encode_message(message, runtime_pb2.ExpertRequest)
    frame = await receive_frame(_stream(parts), limits)
    assert frame is not None
    return decode_frame(frame, limits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensor_round_trip_keeps_dtype_shape_and_bytes(dtype):
    tensor = (torch.randn(2, 3, 5) * 100).to(dtype)
    back = deserialize_tensor(serialize_tensor(tensor), LIMITS)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert tensor_digest(back) == tensor_digest(tensor)


def test_empty_tensor_round_trips():
    back = deserialize_tensor(serialize_tensor(torch.empty(0, 4)), LIMITS)
    assert back.shape == (0, 4)


def test_non_contiguous_tensor_is_sent_by_value():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(deserialize_tensor(serialize_tensor(tensor), LIMITS), tensor)


@pytest.mark.parametrize(
    "proto",
    [
        runtime_pb2.Tensor(buffer=b"\0" * 8, size=[2], dtype="object"),
        runtime_pb2.Tensor(buffer=b"\0" * 8, size=[2], dtype="<f4"),
        runtime_pb2.Tensor(buffer=b"\0" * 7, size=[2], dtype="float32"),
        runtime_pb2.Tensor(buffer=b"\0" * 8, size=[3], dtype="float32"),
        runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1, 1, 1, 1, 2], dtype="float32"),
        runtime_pb2.Tensor(
            buffer=b"\0" * 8, size=[2], dtype="float32", compression=runtime_pb2.FLOAT16
        ),
        runtime_pb2.Tensor(buffer=b"", size=[2**31, 2**31], dtype="float32"),
    ],
    ids=["object", "numpy-name", "short", "long", "too-many-dims", "compressed", "huge-shape"],
)
def test_malformed_tensor_is_refused(proto):
    with pytest.raises(InvalidInput):
        deserialize_tensor(proto, LIMITS)


def test_unsendable_dtype_is_refused():
    with pytest.raises(InvalidInput, match="cannot be sent"):
        serialize_tensor(torch.zeros(2, dtype=torch.complex64))


async def test_message_over_4_mib_is_chunked_below_the_cap_and_rebuilt():
    big = torch.randn(3, 700, 1024)  # 8.6 MB
    message = Message("x", {"a": 1, "b": b"\x00\xff"}, (big, torch.arange(5), torch.empty(0, 3)))
    parts = encode_message(message, runtime_pb2.ExpertResponse)
    assert len(parts) > 4
    assert all(part.ByteSize() < MESSAGE_CAP_BYTES for part in parts)
    assert all(not part.metadata for part in parts[1:])
    back = await _round_trip(message)
    assert back.kind == "x" and back.body == {"a": 1, "b": b"\x00\xff"}
    assert torch.equal(back.tensors[0], big)
    assert torch.equal(back.tensors[1], torch.arange(5))
    assert back.tensors[2].shape == (0, 3)


async def test_several_messages_on_one_stream_are_read_one_at_a_time():
    first = Message("a", {}, (torch.randn(600, 1024),))
    second = Message("b", {"n": 2})
    parts = [*encode_message(first, runtime_pb2.ExpertRequest)]
    parts += encode_message(second, runtime_pb2.ExpertRequest)
    stream = _stream(parts)
    one = decode_frame(await receive_frame(stream, LIMITS), LIMITS)
    two = decode_frame(await receive_frame(stream, LIMITS), LIMITS)
    assert (one.kind, two.kind) == ("a", "b")
    assert await receive_frame(stream, LIMITS) is None


async def test_tensor_bytes_over_the_limit_are_drained_and_refused_recoverably():
    limits = WireLimits(max_tensor_bytes=PART_BYTES)
    message = Message("big", {}, (torch.zeros(3 * PART_BYTES // 4),))
    after = Message("next")
    parts = encode_message(message, runtime_pb2.ExpertRequest)
    parts += encode_message(after, runtime_pb2.ExpertRequest)
    stream = _stream(parts)
    frame = await receive_frame(stream, limits)
    with pytest.raises(InvalidInput, match="over the limit"):
        decode_frame(frame, limits)
    assert decode_frame(await receive_frame(stream, limits), limits).kind == "next"


@pytest.mark.parametrize(
    "metadata",
    [
        b"garbage bytes",
        canonical([1, 2]),
        canonical({"protocol": 1, "kind": "x", "parts": 0, "body": {}}),
        canonical({"protocol": 1, "kind": "x", "parts": 10**9, "body": {}}),
        canonical({"protocol": 1, "kind": 3, "parts": 1, "body": {}}),
        canonical({"protocol": 1, "kind": "x", "parts": 1, "body": {}, "extra": 1}),
    ],
    ids=["garbage", "list", "zero-parts", "too-many-parts", "bad-kind", "extra-field"],
)
async def test_broken_envelope_is_a_framing_error(metadata):
    part = runtime_pb2.ExpertRequest(metadata=metadata)
    with pytest.raises(InvalidInput):
        await receive_frame(_stream([part]), LIMITS)


async def test_stream_ending_inside_a_message_is_a_framing_error():
    parts = encode_message(Message("x", {}, (torch.zeros(PART_BYTES),)), runtime_pb2.ExpertRequest)
    with pytest.raises(InvalidInput, match="ended after"):
        await receive_frame(_stream(parts[:1]), LIMITS)


async def test_other_protocol_version_is_refused_recoverably():
    metadata = canonical({"protocol": PROTOCOL_VERSION + 1, "kind": "x", "parts": 1, "body": {}})
    frame = await receive_frame(_stream([runtime_pb2.ExpertRequest(metadata=metadata)]), LIMITS)
    with pytest.raises(InvalidInput, match="protocol version"):
        decode_frame(frame, LIMITS)


async def test_continuation_chunk_without_its_head_is_refused():
    metadata = canonical({"protocol": PROTOCOL_VERSION, "kind": "x", "parts": 1, "body": {}})
    part = runtime_pb2.ExpertRequest(
        metadata=metadata, tensors=[runtime_pb2.Tensor(buffer=b"\0" * 4)]
    )
    frame = await receive_frame(_stream([part]), LIMITS)
    with pytest.raises(InvalidInput, match="head chunk"):
        decode_frame(frame, LIMITS)


async def test_too_many_tensors_are_refused():
    message = Message("x", {}, tuple(torch.zeros(1) for _ in range(LIMITS.max_tensors + 1)))
    with pytest.raises(InvalidInput, match="at most"):
        await _round_trip(message)


def _signed_step(client: Identity, hidden: torch.Tensor) -> StepMessage:
    request = sign_request(
        client,
        protocol_version=PROTOCOL_VERSION,
        model_digest=bytes(32),
        span_digest=bytes(range(32)),
        start=0,
        end=2,
        session_id=os.urandom(16),
        step=0,
        position=0,
        tokens=hidden.shape[0] * hidden.shape[1],
        input_digest=tensor_digest(hidden),
    )
    return StepMessage(request, hidden)


async def test_typed_messages_round_trip():
    client = Identity.generate()
    opening = OpenSession(os.urandom(16), 2, 64, 0, 2, client.public_key, ticket=b"t")
    assert OpenSession.from_message(await _round_trip(opening.to_message())) == opening
    opened = SessionOpened(opening.session_id, 2, 64, 128)
    assert SessionOpened.from_message(await _round_trip(opened.to_message())) == opened
    paid = SessionOpened(opening.session_id, 2, 64, 128, priority="high", note="ticket honoured")
    assert SessionOpened.from_message(await _round_trip(paid.to_message())) == paid
    step = _signed_step(client, torch.randn(2, 3, 8))
    back = StepMessage.from_message(await _round_trip(step.to_message()))
    assert back.request == step.request and torch.equal(back.hidden, step.hidden)
    error = ErrorReply(ErrorCode.BUSY, "full", step=3)
    assert ErrorReply.from_message(await _round_trip(error.to_message())) == error
    info = NodeInfo(
        peer_id="12D3KooWabc",
        public_key=client.public_key,
        model_digest=bytes(32),
        span_digest=bytes(32),
        start=0,
        end=2,
        family="bloom",
        hidden_size=8,
        dtype="float32",
        quant="none",
        max_length=64,
        throughput=123.456,
        cache_tokens_total=100,
        cache_tokens_free=50,
        sessions=1,
        state="online",
        version="0.1.0",
        queued_high=1,
        queued_free=7,
        forward_us=1234,
        overtaken=5,
        preempted=3,
    )
    assert NodeInfo.from_message(await _round_trip(info.to_message())) == info


async def test_priority_fields_are_optional_on_the_wire_and_checked_when_present():
    opened = SessionOpened(os.urandom(16), 1, 8, 8)
    older = Message(
        "opened",
        {
            k: v
            for k, v in opened.to_message().body.items()
            if k in ("session_id", "batch_size", "max_length", "reserved_tokens")
        },
    )
    back = SessionOpened.from_message(await _round_trip(older))
    assert (back.priority, back.note) == ("free", "")
    for extra in ({"priority": "urgent"}, {"note": 5}, {"bonus": 1}):
        body = {**opened.to_message().body, **extra}
        with pytest.raises(InvalidInput):
            SessionOpened.from_message(Message("opened", body))
    step = _signed_step(Identity.generate(), torch.randn(1, 2, 8))
    receipt = make_receipt(Identity.generate(), step.request, bytes(32), bytes(32))
    plain = StepOutput(receipt, step.hidden)
    assert "note" not in plain.to_message().body
    noted = StepOutput(receipt, step.hidden, note="ran at free priority")
    back_output = StepOutput.from_message(await _round_trip(noted.to_message()))
    assert back_output.note == noted.note and back_output.receipt == receipt
    assert StepOutput.from_message(await _round_trip(plain.to_message())).note == ""


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"session_id": b"short", "batch_size": 1, "max_length": 8, "start": 0, "end": 1},
        {
            "session_id": bytes(16),
            "batch_size": True,
            "max_length": 8,
            "start": 0,
            "end": 1,
            "client_key": bytes(32),
            "ticket": None,
        },
        {
            "session_id": bytes(16),
            "batch_size": 1,
            "max_length": 8,
            "start": 2,
            "end": 1,
            "client_key": bytes(32),
            "ticket": None,
        },
    ],
    ids=["empty", "missing-and-short", "bool-as-int", "empty-span"],
)
def test_malformed_open_is_refused(body):
    with pytest.raises(InvalidInput):
        OpenSession.from_message(Message("open", body))


def test_step_message_with_garbage_request_bytes_is_refused():
    message = Message("step", {"request": b"\x07garbage"}, (torch.zeros(1, 1, 8),))
    with pytest.raises(InvalidInput):
        StepMessage.from_message(message)


def test_step_message_of_the_wrong_kind_is_refused():
    step = _signed_step(Identity.generate(), torch.randn(1, 1, 8))
    with pytest.raises(InvalidInput, match="expected"):
        StepMessage.from_message(step.to_message("forward"))


def test_error_replies_become_the_matching_exceptions():
    assert isinstance(ErrorReply(ErrorCode.BUSY, "full").to_exception("p"), NodeBusy)
    refused = ErrorReply(ErrorCode.INVALID, "bad").to_exception("p")
    assert isinstance(refused, RemoteError) and refused.peer_id == "p"
    assert ErrorReply.from_error(NodeBusy("full")).code == ErrorCode.BUSY
    assert ErrorReply.from_error(InvalidInput("no")).code == ErrorCode.INVALID
    internal = ErrorReply.from_error(RuntimeError("secret detail"))
    assert internal.code == ErrorCode.INTERNAL and "secret" not in internal.message


def test_error_reply_with_unknown_code_is_refused():
    with pytest.raises(InvalidInput):
        ErrorReply.from_message(Message("error", {"code": "nope", "message": "x", "step": None}))
