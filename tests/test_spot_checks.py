"""Spot-checks on a second peer: cheaters are caught and rewound; honest nodes never accused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.verify.evidence import check_evidence

PROMPT = "Trust, but verify"


def _client(swarm: Swarm, tmp_path: Path) -> ClientConfig:
    return ClientConfig(
        initial_peers=tuple(swarm.initial_peers),
        identity=tmp_path / "client.key",
        step_timeout=15.0,
    )


def _honest_tokens(model_dir: Path, config: GenerationConfig) -> torch.Tensor:
    head = load_head(model_dir)
    input_ids = head.tokenizer(PROMPT, return_tensors="pt").input_ids
    return generate(head, LocalBackbone.load(model_dir, [(0, 4)]), input_ids, config)


def steps_to_detect(rate: float, miss_probability: float = 1e-3) -> int:
    """Steps after which a node cheating on every step escapes all checks w.p. < miss."""
    return math.ceil(math.log(miss_probability) / math.log(1 - rate))


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_honest_swarms_are_never_accused(bloom_dir: Path, tmp_path: Path, quant: str):
    """At least 200 checked steps per compute profile, zero accusations."""
    config = GenerationConfig(max_new_tokens=50, stop_at_eos=False)
    checked_steps = 0
    with Swarm(tmp_path / "swarm") as swarm:
        for _ in range(2):  # each node verifies the other
            swarm.start(bloom_dir, blocks="0:4", extra_args=["--quant", quant])
        checks = SpotCheckConfig(rate=1.0, seed=0)
        with DistributedModelForCausalLM.from_pretrained(
            bloom_dir, config=_client(swarm, tmp_path), checks=checks
        ) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            for _ in range(4):
                model.generate(input_ids, config)
                session = model.backbone.last_session
                verdicts = {outcome.verdict for outcome in session.checks}
                bans = model.backbone.swarm.bans
                assert verdicts == {"passed"}, [bans.reason(node.peer_id) for node in swarm.nodes]
                assert not session.rewinds
                checked_steps += max(outcome.steps for outcome in session.checks)
                assert max(outcome.score for outcome in session.checks) < 1e-3
    assert checked_steps >= 200


@pytest.mark.parametrize("adversary", ["noise", "lazy"])
def test_a_cheating_node_is_caught_in_time_and_the_text_stays_honest(
    bloom_dir: Path, tmp_path: Path, adversary: str
):
    rate = 0.25
    config = GenerationConfig(max_new_tokens=32, stop_at_eos=False)
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start(bloom_dir, blocks="0:2")
        cheater = swarm.start(bloom_dir, blocks="2:4", adversary=adversary)
        verifiers = [swarm.start(bloom_dir, blocks="2:4") for _ in range(2)]
        checks = SpotCheckConfig(rate=rate, seed=3)
        with DistributedModelForCausalLM.from_pretrained(
            bloom_dir, config=_client(swarm, tmp_path), checks=checks
        ) as model:
            for verifier in verifiers:  # make the cheater the route's first choice
                model.backbone.swarm.rtts[verifier.peer_id] = 5.0
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            rewinds: list[int] = []
            tokens = model.generate(input_ids, config, on_rewind=rewinds.append)
            session = model.backbone.last_session
            banned = model.backbone.swarm.bans.is_banned(cheater.peer_id)
    assert torch.equal(tokens, _honest_tokens(bloom_dir, config))
    caught = [c for c in session.checks if c.verdict == "caught"]
    assert [c.peer_id for c in caught] == [cheater.peer_id]
    assert caught[0].steps <= steps_to_detect(rate)
    assert rewinds and banned
    assert cheater.peer_id not in {hop.peer_id for hop in session.route}
    evidence = caught[0].evidence
    assert evidence is not None
    verdict = check_evidence(evidence)  # sound evidence, re-checkable offline
    assert verdict.accused == caught[0].node_key
    assert verdict.disagreeing == tuple(range(len(evidence.recomputations)))
