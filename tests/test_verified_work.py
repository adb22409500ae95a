"""Issue 5 end to end: every adversary is caught in time, convicted at the ledger, and the
user's text equals honest generation; honest nodes and their verifiers are paid."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.reporting import report_session
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.audit import audit
from corolla.ledger.sources import HttpSource
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.simulations.ledger_process import LedgerProcess
from corolla.verify.identity import load_or_create_identity

PROMPT = "Verified work earns points"
RATE = 0.25
FRACTION = 0.5
CONFIG = GenerationConfig(max_new_tokens=24, stop_at_eos=False)


def steps_to_detect(rate: float, miss_probability: float = 1e-3) -> int:
    """Checks a node survives with probability below `miss_probability`, at `rate` per step."""
    return math.ceil(math.log(miss_probability) / math.log(1 - rate))


@pytest.fixture(scope="module")
def world(bloom_dir: Path, tmp_path_factory) -> Iterator[tuple[LedgerProcess, Swarm, Path]]:
    """A ledger with a referee and honest nodes [0:2] and [2:4], two each, shared by the cases
    (two per span, so every node has a verifier)."""
    root = tmp_path_factory.mktemp("verified-work")
    with (
        LedgerProcess(root / "ledger.db", root / "ledger.key",
                      extra=["--referee-model", str(bloom_dir)]) as ledger,
        Swarm(root / "nodes") as swarm,
    ):  # fmt: skip
        for blocks in ("0:2", "2:4", "0:2", "2:4"):
            swarm.start(bloom_dir, blocks=blocks, extra_args=["--ledger", ledger.url])
        yield ledger, swarm, root


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """Same shape as the test BLOOM, other weights: what a wrong-model node computes with."""
    tiny = TinyModelConfig(
        family="bloom", num_layers=4, hidden_size=64, num_heads=4, seed=99, initializer_range=0.3
    )
    return create_tiny_model(tmp_path_factory.mktemp("other") / "model", tiny)


def _honest(model_dir: Path) -> torch.Tensor:
    head = load_head(model_dir)
    input_ids = head.tokenizer(PROMPT, return_tensors="pt").input_ids
    return generate(head, LocalBackbone.load(model_dir, [(0, 4)]), input_ids, CONFIG)


ADVERSARIES = {
    "noise": ([], 0),
    "subtle": (["--perturbation", "1e-2"], 0),
    "lazy": ([], 0),
    "selective": (["--cheat-fraction", str(FRACTION)], FRACTION),
    "selective-client": (["--cheat-fraction", "1"], 0),  # cheats only for our client
    "wrong-model": ([], 0),
    "wrong-quant": (["--wrong-quant", "nf4"], 0),
}


@pytest.mark.parametrize("case", list(ADVERSARIES))
def test_each_adversary_is_caught_convicted_and_the_text_stays_honest(
    world, bloom_dir: Path, other_model: Path, tmp_path: Path, case: str
):
    ledger, swarm, _ = world
    client_key = tmp_path / "client.key"
    options, fraction = ADVERSARIES[case]
    adversary = "selective" if case.startswith("selective") else case
    if case == "selective-client":
        prefix = load_or_create_identity(client_key).public_key.hex()[:8]
        options = [*options, "--target-client", prefix]
    if case == "wrong-model":
        options = [*options, "--wrong-model", str(other_model)]
    cheater = swarm.start(
        bloom_dir,
        blocks="2:4",
        adversary=adversary,
        extra_args=[*options, "--ledger", ledger.url],
    )
    try:
        client = ClientConfig(initial_peers=tuple(swarm.initial_peers), identity=client_key)
        checks = SpotCheckConfig(rate=RATE, seed=5)
        with DistributedModelForCausalLM.from_pretrained(
            bloom_dir, config=client, checks=checks
        ) as model:
            for node in swarm.nodes:  # the cheater looks nearest: the route takes it first
                model.backbone.swarm.rtts[node.peer_id] = 0.0001 if node is cheater else 0.01
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            tokens = model.generate(input_ids, CONFIG)
            session = model.backbone.last_session
            with LedgerClient(ledger.url, load_or_create_identity(client_key)) as api:
                report = report_session(api, session.work, session.checks)
                account = api.account(load_or_create_identity(cheater.identity).public_key)
    finally:
        cheater.kill()
    assert torch.equal(tokens, _honest(bloom_dir))
    caught = [check for check in session.checks if check.verdict == "caught"]
    assert [check.peer_id for check in caught] == [cheater.peer_id]
    first_cheat_bound = 0 if fraction == 0 else steps_to_detect(fraction)
    assert caught[0].steps <= steps_to_detect(RATE) + first_cheat_bound
    assert [v.verdict for v in report.verdicts] == ["guilty"]
    assert account is not None and account.slashed and account.balance == 0
    assert cheater.peer_id not in {hop.peer_id for hop in session.route}


def test_honest_work_is_paid_and_the_ledger_audits_clean_after_all_of_it(world, bloom_dir):
    ledger, swarm, root = world
    client = ClientConfig(initial_peers=tuple(swarm.initial_peers), identity=root / "c.key")
    with DistributedModelForCausalLM.from_pretrained(
        bloom_dir, config=client, checks=SpotCheckConfig(rate=0.5, seed=1)
    ) as model:
        input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
        model.generate(input_ids, CONFIG)
        session = model.backbone.last_session
        with LedgerClient(ledger.url, load_or_create_identity(client.identity)) as api:
            report_session(api, session.work, session.checks)
            served = {hop.peer_id for hop in session.route}
            balances = {
                node.peer_id: api.balance(load_or_create_identity(node.identity).public_key)
                for node in swarm.nodes
                if node.process.poll() is None
            }
    assert all(balances[peer] > 0 for peer in served)
    assert all(check.verdict == "passed" for check in session.checks)
    report = audit(HttpSource(ledger.url))
    assert report.evidence_checked >= 1 and report.attestations_verified >= 1
