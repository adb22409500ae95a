"""Failover: dead, lying or misbehaving nodes are banned and routed around; text is unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.errors import RouteUnavailable

PROMPT = "Recovery past the first step"
CONFIG = GenerationConfig(max_new_tokens=20, stop_at_eos=False)


def _local_tokens(model_dir: Path) -> torch.Tensor:
    head = load_head(model_dir)
    input_ids = head.tokenizer(PROMPT, return_tensors="pt").input_ids
    return generate(head, LocalBackbone.load(model_dir, [(0, 4)]), input_ids, CONFIG)


def _model(model_dir: Path, swarm: Swarm, tmp_path: Path, **options) -> DistributedModelForCausalLM:
    config = ClientConfig(
        initial_peers=tuple(swarm.initial_peers),
        identity=tmp_path / "client.key",
        step_timeout=10.0,
        **options,
    )
    return DistributedModelForCausalLM.from_pretrained(model_dir, config=config)


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_a_node_killed_mid_generation_is_replaced_and_the_text_is_unchanged(
    model_dirs, tmp_path, family
):
    model_dir = model_dirs[family]
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start(model_dir, blocks="0:2")
        first, second = swarm.start(model_dir, blocks="2:4"), swarm.start(model_dir, blocks="2:4")
        nodes = {first.peer_id: first, second.peer_id: second}
        with _model(model_dir, swarm, tmp_path) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            killed: list[str] = []

            def kill_at_step_six(tokens: torch.Tensor) -> None:
                session = model.backbone.last_session
                if (
                    len(session.work)
                    and not killed
                    and session.core.past_length > len(input_ids[0]) + 4
                ):
                    victim = session.route[-1].peer_id
                    nodes[victim].kill()
                    killed.append(victim)

            tokens = model.generate(input_ids, CONFIG, on_tokens=kill_at_step_six)
            session = model.backbone.last_session
        assert killed, "the test never killed a node"
        assert torch.equal(tokens, _local_tokens(model_dir))
        assert [f.peer_id for f in session.failovers] == killed
        survivor = next(peer for peer in nodes if peer not in killed)
        assert session.route[-1].peer_id == survivor


@pytest.mark.timeout(120)
def test_with_no_replacement_the_client_gets_a_clear_error_not_a_hang(bloom_dir, tmp_path):
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start(bloom_dir, blocks="0:2")
        only = swarm.start(bloom_dir, blocks="2:4")
        with _model(bloom_dir, swarm, tmp_path) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids

            def kill_after_three(tokens: torch.Tensor) -> None:
                if len(model.backbone.last_session.work) >= 6:
                    only.kill()

            started = time.monotonic()
            with pytest.raises(RouteUnavailable, match=r"block\(s\) 2-3"):
                model.generate(input_ids, CONFIG, on_tokens=kill_after_three)
            waited = time.monotonic() - started
    assert waited < 60  # bounded by the client's timeouts, not a hang


@pytest.mark.parametrize("adversary", ["wrong-key", "bad-digest"])
def test_a_node_whose_receipt_does_not_check_out_is_rejected_and_routed_around(
    bloom_dir, tmp_path, adversary
):
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start(bloom_dir, blocks="0:2")
        liar = swarm.start(bloom_dir, blocks="2:4", adversary=adversary)
        honest = swarm.start(bloom_dir, blocks="2:4")
        # Make the liar the first choice: the honest node is allowed only after it is banned.
        with _model(bloom_dir, swarm, tmp_path, block=frozenset()) as model:
            model.backbone.swarm.rtts[honest.peer_id] = 10.0  # looks far away
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            tokens = model.generate(input_ids, CONFIG)
            session = model.backbone.last_session
        assert torch.equal(tokens, _local_tokens(bloom_dir))
        assert [f.peer_id for f in session.failovers] == [liar.peer_id]
        reason = session.failovers[0].reason
        assert ("BadSignature" if adversary == "wrong-key" else "BadReceipt") in reason
        assert model.backbone.swarm.bans.is_banned(liar.peer_id)
        assert {w.peer_id for w in session.work} == {swarm.nodes[0].peer_id, honest.peer_id}
