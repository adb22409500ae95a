"""Spot-checks v2 on real node processes, without a ledger: the client draws the verifiers
itself, each verifier signs its verdict, and nothing is settled on one peer's word.

Honest swarms are never accused (per compute profile). A cheater's failed check cannot be
judged without a ledger: nobody is banned, but the session stops using the cheater and the
verifier, drops the cheater's unverified text and regenerates it; the dispute it kept is sound
evidence that a referee, run by anyone with the model, convicts. The same with a ledger and its
referee is in tests/test_verified_work.py and tests/test_client_checks_v2_live.py.
"""

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
from corolla.node.referee import Referee
from corolla.verify.disputes import Judgment, check_dispute
from corolla.verify.referee import RefereeConfig
from corolla.verify.verdicts import parse_score

PROMPT = "Trust, but verify"


def _client(swarm: Swarm, tmp_path: Path, prefer: frozenset[str] = frozenset()) -> ClientConfig:
    return ClientConfig(
        initial_peers=tuple(swarm.initial_peers),
        identity=tmp_path / "client.key",
        step_timeout=15.0,
        prefer=prefer,
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
    """At least 200 checked steps per compute profile, zero accusations, nothing unverified."""
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
                result = model.generate_result(input_ids, config)
                log = model.backbone.last_session.log
                verdicts = {outcome.verdict for outcome in log.checks}
                assert verdicts == {"passed"}, [c.note for c in log.checks]
                assert not log.disputes and not log.rewinds
                assert result.unverified == ()
                checked_steps += max(outcome.steps for outcome in log.checks)
                for outcome in log.checks:
                    for record in outcome.records:
                        assert parse_score(record.verdict.score) < 1e-3
                        assert record.verdict.verifier_key != outcome.node_key
    assert checked_steps >= 200


@pytest.mark.parametrize("adversary", ["noise", "lazy"])
def test_without_a_ledger_a_cheater_is_routed_around_and_its_text_regenerated(
    bloom_dir: Path, tmp_path: Path, adversary: str
):
    rate = 0.25
    config = GenerationConfig(max_new_tokens=32, stop_at_eos=False)
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start(bloom_dir, blocks="0:2")
        cheater = swarm.start(bloom_dir, blocks="2:4", adversary=adversary)
        for _ in range(2):  # verifiers, and the route's 2:4 hop once the cheater is avoided
            swarm.start(bloom_dir, blocks="2:4")
        checks = SpotCheckConfig(rate=rate, seed=3)
        client = _client(swarm, tmp_path, prefer=frozenset({cheater.peer_id}))
        with DistributedModelForCausalLM.from_pretrained(
            bloom_dir, config=client, checks=checks
        ) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            rewinds: list[int] = []
            result = model.generate_result(input_ids, config, on_rewind=rewinds.append)
            session = model.backbone.last_session
            bans = model.backbone.swarm.bans
            banned = {node.peer_id for node in swarm.nodes if bans.is_banned(node.peer_id)}
    assert torch.equal(result.tokens, _honest_tokens(bloom_dir, config))
    (dispute,) = session.log.disputes
    assert dispute.peer_id == cheater.peer_id and dispute.ruling.decision == "unjudged"
    assert dispute.steps <= steps_to_detect(rate)
    assert rewinds and [r.peer_id for r in session.log.rewinds] == [cheater.peer_id]
    assert banned == set()  # nobody is banned on one peer's word
    route = {hop.peer_id for hop in session.route}
    assert cheater.peer_id not in route and dispute.verifier.peer_id not in route
    # The evidence kept is sound, and a referee with the model convicts the cheater on it.
    check_dispute(dispute.dispute)
    judgment = Referee(RefereeConfig(bloom_dir)).judge(dispute.dispute)
    assert isinstance(judgment, Judgment)
    assert judgment.node_lied and judgment.lying_verifiers == ()
