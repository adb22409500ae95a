"""The benchmark-only unsigned node (COROLLA_BENCHMARK_UNSIGNED=1): it checks no signature and
signs nothing, and a normal client refuses it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.errors import BadSignature, RemoteError
from corolla.node.model.span import load_span
from corolla.node.protocol.messages import OpenSession, StepMessage
from corolla.node.protocol.stream import InferenceStream, request_forward
from corolla.node.service import BENCHMARK_UNSIGNED_ENV, NodeService, ServiceConfig
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request, verify_receipt
from corolla.version import PROTOCOL_VERSION

ASYNC = pytest.mark.asyncio(loop_scope="module")


def _zero_signed_step(span, session_id: bytes, hidden: torch.Tensor) -> StepMessage:
    """A step as an unsigned benchmark client sends it: an all-zero signature."""
    request = sign_request(
        Identity.generate(),
        protocol_version=PROTOCOL_VERSION,
        model_digest=span.model_digest,
        span_digest=span.digest,
        start=span.start,
        end=span.end,
        session_id=session_id,
        step=0,
        position=0,
        tokens=hidden.shape[1],
        input_digest=tensor_digest(hidden),
    )
    return StepMessage(dataclasses.replace(request, signature=bytes(64)), hidden)


@contextlib.asynccontextmanager
async def _serving(daemons, span, unsigned: bool):
    server, _ = daemons
    service = NodeService(span, Identity.generate(), ServiceConfig(benchmark_unsigned=unsigned))
    await service.add_handlers(server)
    try:
        yield service
    finally:
        await service.remove_handlers(server)
        service.shutdown()


@ASYNC
async def test_an_unsigned_node_serves_unsigned_steps_with_all_zero_receipt_signatures(
    daemons, bloom_dir
):
    server, peer = daemons
    span = load_span(bloom_dir, 0, 2)
    hidden = torch.randn(1, 3, 64)
    session_id = os.urandom(16)
    step = _zero_signed_step(span, session_id, hidden)
    async with _serving(daemons, span, unsigned=True) as service:
        async with InferenceStream(peer, server.peer_id) as stream:
            await stream.open(OpenSession(session_id, 1, 16, 0, 2, step.request.client_key), 30)
            output = await stream.step(step, 30)
        one_shot = await request_forward(peer, server.peer_id, step)
    assert torch.equal(output.hidden, span.forward(hidden))
    assert torch.equal(one_shot.hidden, output.hidden)
    for receipt in (output.receipt, one_shot.receipt):
        assert receipt.signature == bytes(64)
        assert receipt.node_key == service.identity.public_key
        with pytest.raises(BadSignature):
            verify_receipt(
                receipt,
                request=step.request,
                output=output.hidden,
                previous_chain=GENESIS_CHAIN,
                node_key=service.identity.public_key,
            )


@ASYNC
async def test_a_normal_node_refuses_the_same_unsigned_steps(daemons, bloom_dir):
    server, peer = daemons
    span = load_span(bloom_dir, 0, 2)
    session_id = os.urandom(16)
    step = _zero_signed_step(span, session_id, torch.randn(1, 3, 64))
    async with _serving(daemons, span, unsigned=False):
        async with InferenceStream(peer, server.peer_id) as stream:
            await stream.open(OpenSession(session_id, 1, 16, 0, 2, step.request.client_key), 30)
            with pytest.raises(RemoteError, match="signature"):
                await stream.step(step, 30)
        with pytest.raises(RemoteError, match="signature"):
            await request_forward(peer, server.peer_id, step)


PROMPT = "Signatures cost what?"


@pytest.mark.timeout(240)
def test_a_normal_client_rejects_an_unsigned_node_and_routes_around_it(
    bloom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(BENCHMARK_UNSIGNED_ENV, raising=False)  # this client signs and checks
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start(bloom_dir, blocks="0:2")
        unsigned = swarm.start(bloom_dir, blocks="2:4", env={BENCHMARK_UNSIGNED_ENV: "1"})
        honest = swarm.start(bloom_dir, blocks="2:4")
        assert f"WARNING: {BENCHMARK_UNSIGNED_ENV}=1" in unsigned.output
        client = ClientConfig(
            initial_peers=tuple(swarm.initial_peers),
            identity=tmp_path / "client.key",
            step_timeout=15.0,
        )
        with DistributedModelForCausalLM.from_pretrained(bloom_dir, config=client) as model:
            model.backbone.swarm.rtts[honest.peer_id] = 10.0  # the unsigned node goes first
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            tokens = model.generate(input_ids, config)
            session = model.backbone.last_session
    assert [f.peer_id for f in session.failovers] == [unsigned.peer_id]
    assert "BadSignature" in session.failovers[0].reason
    assert unsigned.peer_id not in {w.peer_id for w in session.work}
    head = load_head(bloom_dir)
    assert torch.equal(
        tokens, generate(head, LocalBackbone.load(bloom_dir, [(0, 4)]), input_ids, config)
    )
