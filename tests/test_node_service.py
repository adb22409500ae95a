"""The node service over real hivemind daemons: good sessions, and every kind of bad input.

An in-process :class:`NodeService` serves blocks 0:2 of the tiny BLOOM on one P2P daemon; the test
talks to it from another daemon through the raw client of :mod:`corolla.node.protocol.stream`. After
each refusal the node must still serve a good step, on the same stream or a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os

import pytest
import torch
from hivemind.proto import runtime_pb2

from corolla.errors import NodeBusy, NodeUnavailable, RemoteError
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.framing import END_OF_STREAM, pack_parts, read_part
from corolla.node.protocol.messages import (
    HANDLE_FORWARD,
    HANDLE_INFERENCE,
    HANDLE_INFO,
    KIND_FORWARD,
    OpenSession,
    StepMessage,
    StepOutput,
)
from corolla.node.protocol.stream import InferenceStream, read_reply, request_forward, request_info
from corolla.node.protocol.tensors import MESSAGE_CAP_BYTES, Message, WireLimits, encode_message
from corolla.node.service import NodeService, ServiceConfig
from corolla.node.sessions import SessionConfig
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request, verify_receipt
from corolla.version import PROTOCOL_VERSION

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def span(bloom_dir) -> Span:
    return load_span(bloom_dir, 0, 2)


@pytest.fixture
def serve(daemons, span):
    """serve(config) -> async context manager running a NodeService on the server daemon."""
    server, _ = daemons

    @contextlib.asynccontextmanager
    async def running(config: ServiceConfig | None = None, behaviour=None):
        service = NodeService(span, Identity.generate(), config, behaviour)
        await service.add_handlers(server)
        try:
            yield service
        finally:
            await service.remove_handlers(server)
            service.shutdown()

    return running


class Client:
    """Signs the steps of one session and keeps a local reference cache to compare with."""

    def __init__(self, span: Span, batch_size: int = 1, max_length: int = 32) -> None:
        self.span = span
        self.identity = Identity.generate()
        self.session_id = os.urandom(16)
        self.batch_size = batch_size
        self.max_length = max_length
        self.step_index = 0
        self.position = 0
        self.chain = GENESIS_CHAIN
        self.reference = span.new_cache(batch_size)
        self.generator = torch.Generator().manual_seed(0)

    def opening(self) -> OpenSession:
        return OpenSession(
            self.session_id,
            self.batch_size,
            self.max_length,
            self.span.start,
            self.span.end,
            self.identity.public_key,
        )

    def hidden(self, tokens: int = 1) -> torch.Tensor:
        shape = (self.batch_size, tokens, self.span.hidden_size)
        return torch.randn(shape, generator=self.generator)

    def step(self, hidden: torch.Tensor, **overrides) -> StepMessage:
        fields = dict(
            protocol_version=PROTOCOL_VERSION,
            model_digest=self.span.model_digest,
            span_digest=self.span.digest,
            start=self.span.start,
            end=self.span.end,
            session_id=self.session_id,
            step=self.step_index,
            position=self.position,
            tokens=hidden.shape[0] * hidden.shape[1],
            input_digest=tensor_digest(hidden),
        )
        fields.update(overrides)
        signer = fields.pop("signer", self.identity)
        return StepMessage(sign_request(signer, **fields), hidden)

    def accept(self, step: StepMessage, output: StepOutput, node_key: bytes) -> None:
        """Check the reply like a client would, and move the session forward."""
        verify_receipt(
            output.receipt,
            request=step.request,
            output=output.hidden,
            previous_chain=self.chain,
            node_key=node_key,
        )
        expected = self.span.forward(step.hidden, self.reference)
        assert torch.equal(output.hidden, expected)
        self.chain = output.receipt.chain_digest
        self.step_index += 1
        self.position += step.hidden.shape[0] * step.hidden.shape[1]

    async def good_step(self, stream: InferenceStream, node_key: bytes, tokens: int = 1) -> None:
        step = self.step(self.hidden(tokens))
        self.accept(step, await stream.step(step, TIMEOUT), node_key)


@contextlib.asynccontextmanager
async def session(daemons, service: NodeService, client: Client):
    server, peer = daemons
    stream = InferenceStream(peer, server.peer_id)
    try:
        await stream.open(client.opening(), TIMEOUT)
        yield stream
    finally:
        await stream.close()


async def _sessions(daemons) -> int:
    server, client = daemons
    return (await request_info(client, server.peer_id)).sessions


async def _wait_for_sessions(daemons, count: int) -> int:
    for _ in range(100):
        found = await _sessions(daemons)
        if found == count:
            return found
        await asyncio.sleep(0.05)
    return found


# --------------------------------------------------------------------------- good paths


async def test_session_steps_match_the_local_span_and_receipts_chain(daemons, serve, span):
    async with serve() as service:
        client = Client(span)
        async with session(daemons, service, client) as stream:
            key = service.identity.public_key
            await client.good_step(stream, key, tokens=5)
            for _ in range(3):
                await client.good_step(stream, key)
            assert await _sessions(daemons) == 1
        assert await _wait_for_sessions(daemons, 0) == 0


async def test_session_on_part_of_the_span_runs_only_those_blocks(daemons, serve, span):
    server, peer = daemons
    async with serve() as service:
        part = span.subspan(1, 2)
        client = Client(part)
        async with session(daemons, service, client) as stream:
            await client.good_step(stream, service.identity.public_key, tokens=4)
            await client.good_step(stream, service.identity.public_key)
            assert client.step(client.hidden()).request.span_digest != span.digest
        hidden = client.hidden(5)
        output = await request_forward(
            peer, server.peer_id, client.step(hidden, step=0, position=0)
        )
        assert torch.equal(output.hidden, part.forward(hidden))


async def test_a_one_shot_forward_stream_stays_open_after_the_reply_until_the_client_hangs_up(
    daemons, serve, span
):
    """Closing right after the last write can lose it in the libp2p daemon, so the node waits
    for the client to hang up, even though hivemind's client sends its end-of-requests marker
    at once."""
    server, peer = daemons
    async with serve() as service:
        client = Client(span)
        hidden = client.hidden(3)
        step = client.step(hidden, step=0, position=0)
        _, reader, writer = await peer.call_binary_stream_handler(server.peer_id, HANDLE_FORWARD)
        try:
            parts = encode_message(step.to_message(KIND_FORWARD), runtime_pb2.ExpertRequest)
            writer.write(pack_parts(parts) + END_OF_STREAM)
            await writer.drain()
            part = await asyncio.wait_for(
                read_part(reader, runtime_pb2.ExpertResponse, MESSAGE_CAP_BYTES), TIMEOUT
            )
            assert part is not None

            async def reply_parts():
                yield part

            output = StepOutput.from_message(
                await read_reply(reply_parts(), WireLimits(), server.peer_id)
            )
            assert torch.equal(output.hidden, span.forward(hidden))
            verify_receipt(
                output.receipt,
                request=step.request,
                output=output.hidden,
                previous_chain=GENESIS_CHAIN,
                node_key=service.identity.public_key,
            )
            with pytest.raises(TimeoutError):  # the node has not closed its side
                await asyncio.wait_for(reader.read(1), 0.5)
        finally:
            writer.close()


async def test_a_subclass_of_the_service_serves_the_same_protocol_under_any_class_name(
    daemons, span
):
    server, peer = daemons

    class RenamedService(NodeService):
        """E.g. an adversary's service: hivemind would derive other handler names from it."""

    service = RenamedService(span, Identity.generate())
    await service.add_handlers(server)
    try:
        assert (await request_info(peer, server.peer_id, timeout=TIMEOUT)).start == span.start
        client = Client(span)
        async with session(daemons, service, client) as stream:
            await client.good_step(stream, service.identity.public_key, tokens=2)
        hidden = client.hidden(3)
        one_shot = client.step(hidden, step=0, position=0)
        output = await request_forward(peer, server.peer_id, one_shot)
        assert torch.equal(output.hidden, span.forward(hidden))
    finally:
        await service.remove_handlers(server)
        service.shutdown()
    with pytest.raises(NodeUnavailable):  # removed under the same names
        await request_info(peer, server.peer_id, timeout=5)


async def test_batched_session_works(daemons, serve, span):
    async with serve() as service:
        client = Client(span, batch_size=3)
        async with session(daemons, service, client) as stream:
            await client.good_step(stream, service.identity.public_key, tokens=4)
            await client.good_step(stream, service.identity.public_key)


async def test_info_describes_the_span_and_the_room_left(daemons, serve, span):
    server, peer = daemons
    config = ServiceConfig(sessions=SessionConfig(max_cache_tokens=1000))
    async with serve(config) as service:
        info = await request_info(peer, server.peer_id)
        assert (info.start, info.end, info.hidden_size) == (0, 2, span.hidden_size)
        assert info.model_digest == span.model_digest and info.span_digest == span.digest
        assert info.public_key == service.identity.public_key
        assert info.peer_id == server.peer_id.to_base58()
        assert (info.dtype, info.quant, info.protocol) == ("float32", "none", PROTOCOL_VERSION)
        assert info.forward_us == 0  # nothing computed yet
        client = Client(span, batch_size=2, max_length=100)
        async with session(daemons, service, client) as stream:
            info = await request_info(peer, server.peer_id)
            assert (info.cache_tokens_free, info.sessions) == (800, 1)
            await stream.step(client.step(client.hidden(tokens=3), step=0, position=0))
            assert (await request_info(peer, server.peer_id)).forward_us > 0


async def test_forward_over_more_than_4_mib_equals_a_local_forward(daemons, serve, span):
    server, peer = daemons
    async with serve() as service:
        client = Client(span, batch_size=33)
        hidden = client.hidden(tokens=500)  # 33 x 500 x 64 floats = 4.2 MB > 4 MiB each way
        step = client.step(hidden, step=0, position=0)
        output = await request_forward(peer, server.peer_id, step, timeout=120)
        verify_receipt(
            output.receipt,
            request=step.request,
            output=output.hidden,
            previous_chain=GENESIS_CHAIN,
            node_key=service.identity.public_key,
        )
        assert torch.equal(output.hidden, span.forward(hidden))


# --------------------------------------------------------------------------- refusals


def _with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[0, 0, 3] = value
    return tensor


def _forged(client: Client) -> StepMessage:
    step = client.step(client.hidden())
    return StepMessage(dataclasses.replace(step.request, signature=bytes(64)), step.hidden)


OTHER_CLIENT = Identity.generate()

# (what is wrong, how to build it from the session's client, the error the node answers)
BAD_STEPS = [
    ("wrong hidden size", lambda c: c.step(torch.randn(1, 1, c.span.hidden_size + 1)), "size"),
    ("wrong dtype", lambda c: c.step(c.hidden().double()), "must be torch.float32"),
    ("NaN", lambda c: c.step(_with_value(c.hidden(), float("nan"))), "NaN"),
    ("inf", lambda c: c.step(_with_value(c.hidden(), float("-inf"))), "infinity"),
    ("bad signature", _forged, "signature"),
    ("another client", lambda c: c.step(c.hidden(), signer=OTHER_CLIENT), "another client"),
    ("digest mismatch", lambda c: c.step(c.hidden(), input_digest=bytes(32)), "input digest"),
    ("unknown session", lambda c: c.step(c.hidden(), session_id=bytes(16)), "unknown session"),
    ("skipped step", lambda c: c.step(c.hidden(), step=c.step_index + 1), "skips ahead"),
    ("wrong position", lambda c: c.step(c.hidden(), position=c.position + 1), "position"),
    ("wrong tokens", lambda c: c.step(c.hidden(), tokens=2), "tokens"),
    ("wrong model", lambda c: c.step(c.hidden(), model_digest=bytes(32)), "another model"),
    ("wrong span", lambda c: c.step(c.hidden(), span_digest=bytes(32)), "span digest"),
    ("wrong blocks", lambda c: c.step(c.hidden(), end=3), "blocks"),
    ("past max length", lambda c: c.step(c.hidden(c.max_length)), "max length"),
    ("batch mismatch", lambda c: c.step(torch.randn(2, 1, c.span.hidden_size)), "batch"),
]


@pytest.mark.parametrize(
    ("build", "text"), [case[1:] for case in BAD_STEPS], ids=[case[0] for case in BAD_STEPS]
)
async def test_malformed_step_is_refused_and_the_session_goes_on(daemons, serve, span, build, text):
    async with serve() as service:
        client = Client(span, max_length=16)
        key = service.identity.public_key
        async with session(daemons, service, client) as stream:
            await client.good_step(stream, key, tokens=3)
            with pytest.raises(RemoteError, match=text):
                await stream.step(build(client), TIMEOUT)
            await client.good_step(stream, key)  # the session was left as it was


async def test_tensor_over_the_limit_is_refused_and_the_stream_goes_on(daemons, serve, span):
    config = ServiceConfig(limits=WireLimits(max_tensor_bytes=64 * 1024))
    async with serve(config) as service:
        client = Client(span, max_length=400)
        async with session(daemons, service, client) as stream:
            big = client.step(client.hidden(tokens=300))  # 300 x 64 x 4 = 76.8 KB
            with pytest.raises(RemoteError, match="over the limit"):
                await stream.step(big, TIMEOUT)
            await client.good_step(stream, service.identity.public_key, tokens=2)


async def test_duplicate_step_returns_the_same_output_without_advancing(daemons, serve, span):
    async with serve() as service:
        client = Client(span)
        key = service.identity.public_key
        async with session(daemons, service, client) as stream:
            step = client.step(client.hidden(4))
            first = await stream.step(step, TIMEOUT)
            again = await stream.step(step, TIMEOUT)
            assert torch.equal(first.hidden, again.hidden) and first.receipt == again.receipt
            client.accept(step, first, key)
            await client.good_step(stream, key)  # still at the position after one step
            changed = client.step(client.hidden(), step=client.step_index - 1)
            with pytest.raises(RemoteError, match="another request"):
                await stream.step(changed, TIMEOUT)
            old = client.step(client.hidden(), step=0)
            with pytest.raises(RemoteError, match="long done"):
                await stream.step(old, TIMEOUT)
            await client.good_step(stream, key)


async def test_garbage_in_a_message_body_is_refused_and_the_stream_goes_on(daemons, serve, span):
    async with serve() as service:
        client = Client(span)
        async with session(daemons, service, client) as stream:
            bad_tensor = runtime_pb2.Tensor(buffer=os.urandom(13), size=[1, 1, 64], dtype="float32")
            bad_tensor.chunks = 1
            garbage = [
                Message("step", {"request": os.urandom(40)}, (client.hidden(),)),
                Message("step", {"nonsense": 1}),
                Message("open", {}),
                Message("bogus-kind"),
            ]
            for message in garbage:
                await stream.send(message)
                with pytest.raises(RemoteError):
                    await stream.receive(TIMEOUT)
            (part,) = encode_message(Message("step", {"request": b""}), runtime_pb2.ExpertRequest)
            part.tensors.append(bad_tensor)
            await stream.send_parts([part])
            with pytest.raises(RemoteError, match="bytes"):
                await stream.receive(TIMEOUT)
            await client.good_step(stream, service.identity.public_key)


async def test_garbage_framing_closes_only_that_stream(daemons, serve, span):
    server, peer = daemons
    async with serve() as service:
        client = Client(span)
        async with session(daemons, service, client) as stream:
            await stream.send_parts([runtime_pb2.ExpertRequest(metadata=os.urandom(64))])
            with pytest.raises(RemoteError, match="unreadable"):
                await stream.receive(TIMEOUT)
            with pytest.raises(NodeUnavailable):
                await stream.receive(TIMEOUT)
        assert await _wait_for_sessions(daemons, 0) == 0
        # raw bytes that are not even protobuf, straight onto the libp2p stream
        _, _, writer = await peer.call_binary_stream_handler(server.peer_id, HANDLE_INFERENCE)
        writer.write(b"\x00" + (10).to_bytes(8, "big") + os.urandom(10) + os.urandom(100))
        await writer.drain()
        writer.close()
        fresh = Client(span)
        async with session(daemons, service, fresh) as stream:
            await fresh.good_step(stream, service.identity.public_key)


async def test_step_before_open_is_an_unknown_session(daemons, serve, span):
    server, peer = daemons
    async with serve() as service:
        client = Client(span)
        stream = InferenceStream(peer, server.peer_id)
        try:
            with pytest.raises(RemoteError, match="unknown session"):
                await stream.step(client.step(client.hidden()), TIMEOUT)
            await stream.open(client.opening(), TIMEOUT)
            await client.good_step(stream, service.identity.public_key)
        finally:
            await stream.close()


async def test_open_for_other_blocks_or_too_long_is_refused(daemons, serve, span):
    server, peer = daemons
    async with serve():
        client = Client(span)
        async with InferenceStream(peer, server.peer_id) as stream:
            wrong = dataclasses.replace(client.opening(), end=3)
            with pytest.raises(RemoteError, match="serves blocks"):
                await stream.open(wrong, TIMEOUT)
            long = dataclasses.replace(client.opening(), max_length=span.max_length + 1)
            with pytest.raises(RemoteError, match="exceeds"):
                await stream.open(long, TIMEOUT)


async def test_session_over_the_cache_budget_is_refused_as_busy(daemons, serve, span):
    server, peer = daemons
    config = ServiceConfig(sessions=SessionConfig(max_cache_tokens=100))
    async with serve(config) as service:
        holder = Client(span, max_length=60)
        async with (
            session(daemons, service, holder),
            InferenceStream(peer, server.peer_id) as stream,
        ):
            with pytest.raises(NodeBusy, match="no room"):
                await stream.open(Client(span, max_length=50).opening(), TIMEOUT)
            small = Client(span, max_length=40)
            await stream.open(small.opening(), TIMEOUT)
            await small.good_step(stream, service.identity.public_key)
        assert await _wait_for_sessions(daemons, 0) == 0
        later = Client(span, batch_size=2, max_length=50)
        async with session(daemons, service, later) as stream:
            await later.good_step(stream, service.identity.public_key)


async def test_idle_session_times_out_and_frees_its_cache(daemons, serve, span):
    config = ServiceConfig(sessions=SessionConfig(max_cache_tokens=100, idle_timeout=0.5))
    async with serve(config) as service:
        client = Client(span, max_length=100)
        async with session(daemons, service, client) as stream:
            await client.good_step(stream, service.identity.public_key)
            with pytest.raises(RemoteError, match="no message for"):
                await stream.receive(TIMEOUT)
            assert await _wait_for_sessions(daemons, 0) == 0
        again = Client(span, max_length=100)
        async with session(daemons, service, again) as stream:
            await again.good_step(stream, service.identity.public_key)


async def test_dropped_connection_frees_the_session(daemons, serve, span):
    async with serve() as service:
        client = Client(span)
        async with session(daemons, service, client) as stream:
            await client.good_step(stream, service.identity.public_key)
            assert await _sessions(daemons) == 1
            await stream.abort()
            assert await _wait_for_sessions(daemons, 0) == 0


async def test_forward_refuses_bad_requests_and_then_serves(daemons, serve, span):
    server, peer = daemons
    async with serve() as service:
        client = Client(span)
        hidden = client.hidden(6)
        bad = [
            client.step(hidden, position=3),
            client.step(hidden, input_digest=bytes(32)),
            client.step(torch.full_like(hidden, float("nan"))),
            client.step(hidden, model_digest=bytes(32)),
        ]
        for step in bad:
            with pytest.raises(RemoteError):
                await request_forward(peer, server.peer_id, step, timeout=TIMEOUT)
        good = client.step(hidden)
        output = await request_forward(peer, server.peer_id, good, timeout=TIMEOUT)
        assert torch.equal(output.hidden, span.forward(hidden))
        assert output.receipt.node_key == service.identity.public_key


async def test_garbage_to_forward_and_info_does_not_hurt_the_node(daemons, serve, span):
    server, peer = daemons
    async with serve():
        garbage = runtime_pb2.ExpertRequest(metadata=canonical({"nonsense": True}))
        info_reply = await peer.call_protobuf_handler(
            server.peer_id, HANDLE_INFO, garbage, runtime_pb2.ExpertResponse
        )
        assert info_reply.metadata  # info ignores the request's content
        responses = await peer.iterate_protobuf_handler(
            server.peer_id, HANDLE_FORWARD, garbage, runtime_pb2.ExpertResponse
        )
        with pytest.raises(RemoteError, match="envelope"):
            await read_reply(responses, WireLimits(), server.peer_id)
        assert (await request_info(peer, server.peer_id)).start == 0
