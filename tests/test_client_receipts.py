"""No environment switches the client's receipt check off: with the old benchmark variable set
(COROLLA_BENCHMARK_UNSIGNED=1), a client with its default config still refuses a real node
process that signs its receipts with a key other than the one it announced.

The fast versions of these faults (and the config field that alone turns the check off, for
benchmarks) are in tests/test_client_session_faults.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from swarm_fixtures import Swarm
from test_swarm_cli import corolla

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.verify.identity import load_or_create_identity

PROMPT = "Forged receipts"
CONFIG = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
OLD_SWITCH = {"COROLLA_BENCHMARK_UNSIGNED": "1"}


@pytest.fixture(scope="module")
def forger_swarm(bloom_dir: Path, tmp_path_factory) -> Iterator[Swarm]:
    """nodes[0] honest 0:2, nodes[1] wrong-key 2:4, nodes[2] honest 2:4 (started before any
    test sets the variable: the nodes themselves are ordinary)."""
    with Swarm(tmp_path_factory.mktemp("forgers")) as swarm:
        swarm.start(bloom_dir, blocks="0:2")
        swarm.start(bloom_dir, blocks="2:4", adversary="wrong-key")
        swarm.start(bloom_dir, blocks="2:4")
        yield swarm


@pytest.mark.timeout(300)
def test_a_default_client_refuses_a_forged_receipt_with_the_old_switch_set(
    forger_swarm: Swarm, bloom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name, value in OLD_SWITCH.items():
        monkeypatch.setenv(name, value)
    nodes = forger_swarm.nodes
    head_node, forger, honest = nodes
    config = ClientConfig(
        initial_peers=tuple(forger_swarm.initial_peers),
        identity=tmp_path / "client.key",
        step_timeout=30.0,
        prefer=frozenset({forger.peer_id}),  # the forger is the route's first choice
    )
    with DistributedModelForCausalLM.from_pretrained(bloom_dir, config=config) as model:
        input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
        tokens = model.generate(input_ids, CONFIG)
        session = model.backbone.last_session
        banned = model.backbone.swarm.bans.is_banned(forger.peer_id)
    head = load_head(bloom_dir)
    local = generate(head, LocalBackbone.load(bloom_dir, [(0, 4)]), input_ids, CONFIG)
    assert torch.equal(tokens, local)
    assert [f.peer_id for f in session.log.failovers] == [forger.peer_id]
    assert "BadSignature" in session.log.failovers[0].reason
    assert banned
    keys = {node.peer_id: load_or_create_identity(node.identity).public_key for node in nodes}
    assert {w.peer_id for w in session.log.work} == {head_node.peer_id, honest.peer_id}
    assert all(w.receipt.node_key == keys[w.peer_id] for w in session.log.work)


@pytest.mark.timeout(300)
def test_corolla_generate_with_the_old_switch_set_refuses_a_route_through_the_forger(
    forger_swarm: Swarm, bloom_dir: Path, tmp_path: Path
):
    head_node, forger, _ = forger_swarm.nodes
    result = corolla(
        "generate", "--model", str(bloom_dir), "--initial-peers", forger_swarm.initial_peers[0],
        "--identity", str(tmp_path / "client.key"), "--max-new-tokens", "4", "--json",
        "--check-rate", "0", "--allow", head_node.peer_id, "--allow", forger.peer_id, PROMPT,
        env=OLD_SWITCH,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "BadSignature" in lines[0]
    assert forger.peer_id in lines[0]
