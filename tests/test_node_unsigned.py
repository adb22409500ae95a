"""The benchmarks' unsigned node (``benchmarks/unsigned.py``): it checks no signature and signs
nothing, it is reached only through an explicit config, and a normal node or client refuses it
whatever the environment says."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
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
from corolla.node.service import NodeService, ServiceConfig
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request, verify_receipt
from corolla.version import PROTOCOL_VERSION

ASYNC = pytest.mark.asyncio(loop_scope="module")
OLD_SWITCH = "COROLLA_BENCHMARK_UNSIGNED"
"""The environment variable that once switched signatures off; it must change nothing now."""


def _benchmark_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "unsigned.py"
    spec = importlib.util.spec_from_file_location("benchmarks_unsigned", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


unsigned = _benchmark_module()


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
async def _serving(daemons, span, config: ServiceConfig, behaviour=None):
    server, _ = daemons
    service = NodeService(span, Identity.generate(), config, behaviour)
    await service.add_handlers(server)
    try:
        yield service
    finally:
        await service.remove_handlers(server)
        service.shutdown()


@ASYNC
async def test_the_benchmarks_unsigned_node_serves_unsigned_steps_with_all_zero_receipts(
    daemons, bloom_dir
):
    server, peer = daemons
    span = load_span(bloom_dir, 0, 2)
    hidden = torch.randn(1, 3, 64)
    session_id = os.urandom(16)
    step = _zero_signed_step(span, session_id, hidden)
    config = ServiceConfig(benchmark_unsigned=True)
    async with _serving(daemons, span, config, unsigned.UnsignedBehaviour()) as service:
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
@pytest.mark.parametrize("switch", [None, "1"])
async def test_a_normal_node_refuses_unsigned_steps_whatever_the_environment(
    daemons, bloom_dir, monkeypatch, switch
):
    if switch is None:
        monkeypatch.delenv(OLD_SWITCH, raising=False)
    else:
        monkeypatch.setenv(OLD_SWITCH, switch)
    server, peer = daemons
    span = load_span(bloom_dir, 0, 2)
    session_id = os.urandom(16)
    step = _zero_signed_step(span, session_id, torch.randn(1, 3, 64))
    async with _serving(daemons, span, ServiceConfig()):
        async with InferenceStream(peer, server.peer_id) as stream:
            await stream.open(OpenSession(session_id, 1, 16, 0, 2, step.request.client_key), 30)
            with pytest.raises(RemoteError, match="signature"):
                await stream.step(step, 30)
        with pytest.raises(RemoteError, match="signature"):
            await request_forward(peer, server.peer_id, step)


PROMPT = "Signatures cost what?"


@pytest.mark.timeout(300)
def test_a_normal_client_rejects_an_unsigned_node_and_normal_nodes_stay_signed_in_any_environment(
    bloom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(OLD_SWITCH, "1")  # the client and every node process inherit it
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    with Swarm(tmp_path / "swarm") as swarm:
        first = swarm.start(bloom_dir, blocks="0:2")
        bad = swarm.start(bloom_dir, blocks="2:4", program=unsigned.UNSIGNED_NODE_PROGRAM)
        honest = swarm.start(bloom_dir, blocks="2:4")
        assert "NO client signature" in bad.output
        assert "NO client signature" not in first.output + honest.output
        client = ClientConfig(
            initial_peers=tuple(swarm.initial_peers),
            identity=tmp_path / "client.key",
            step_timeout=15.0,
            prefer=frozenset({bad.peer_id}),  # the unsigned node goes first
        )
        with DistributedModelForCausalLM.from_pretrained(bloom_dir, config=client) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            tokens = model.generate(input_ids, config)
            log = model.backbone.last_session.log
    assert [f.peer_id for f in log.failovers] == [bad.peer_id]
    assert "BadSignature" in log.failovers[0].reason
    assert bad.peer_id not in {w.peer_id for w in log.work}
    assert {w.peer_id for w in log.work} == {first.peer_id, honest.peer_id}
    head = load_head(bloom_dir)
    assert torch.equal(
        tokens, generate(head, LocalBackbone.load(bloom_dir, [(0, 4)]), input_ids, config)
    )
