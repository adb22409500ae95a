"""Issue 5 end to end, on checks v2: every adversary is caught by the verifier the ledger's
beacon assigns, convicted by the ledger's referee (not by the client, not by a vote), and the
user's text equals honest generation; honest nodes and their verifiers are paid for work a
counted verdict covers, and the ledger audits clean."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from swarm_fixtures import Swarm
from test_client_checks_v2_live import PERIOD, key_of, wait_declared

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
    (two per span, so every node has a verifier), each declared to the ledger."""
    root = tmp_path_factory.mktemp("verified-work")
    extra = ["--referee-model", str(bloom_dir), "--beacon-period-s", str(PERIOD)]
    with (
        LedgerProcess(root / "ledger.db", root / "ledger.key", extra=extra) as ledger,
        Swarm(root / "nodes") as swarm,
    ):
        spans = ("0:2", "2:4", "0:2", "2:4")
        nodes = [
            swarm.start(bloom_dir, blocks=blocks, extra_args=["--ledger", ledger.url])
            for blocks in spans
        ]
        wait_declared(ledger.url, bloom_dir, list(zip(nodes, spans, strict=True)))
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
        wait_declared(ledger.url, bloom_dir, [(cheater, "2:4")])
        client = ClientConfig(  # the route takes the cheater first
            initial_peers=tuple(swarm.initial_peers),
            identity=client_key,
            prefer=frozenset({cheater.peer_id}),
        )
        checks = SpotCheckConfig(rate=RATE, seed=5)
        with DistributedModelForCausalLM.from_pretrained(
            bloom_dir, config=client, checks=checks, ledger=ledger.url
        ) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            tokens = model.generate(input_ids, CONFIG)
            session = model.backbone.last_session
            with LedgerClient(ledger.url, load_or_create_identity(client_key)) as api:
                report_session(api, session.log.work, session.log.checks)
                account = api.account(key_of(cheater))
    finally:
        cheater.kill()
    assert torch.equal(tokens, _honest(bloom_dir))
    convicted = [d for d in session.log.disputes if d.ruling.decision == "node-lied"]
    assert [d.peer_id for d in convicted] == [cheater.peer_id]
    assert convicted[0].ruling.judge == "referee"
    first_cheat_bound = 0 if fraction == 0 else steps_to_detect(fraction)
    assert convicted[0].steps <= steps_to_detect(RATE) + first_cheat_bound
    assert account is not None and account.slashed and account.balance == 0
    assert cheater.peer_id not in {hop.peer_id for hop in session.route}


def test_honest_work_is_paid_and_the_ledger_audits_clean_after_all_of_it(world, bloom_dir):
    ledger, swarm, root = world
    client = ClientConfig(initial_peers=tuple(swarm.initial_peers), identity=root / "c.key")
    with DistributedModelForCausalLM.from_pretrained(
        bloom_dir, config=client, checks=SpotCheckConfig(rate=0.5, seed=1), ledger=ledger.url
    ) as model:
        input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
        result = model.generate_result(input_ids, CONFIG)
        session = model.backbone.last_session
        with LedgerClient(ledger.url, load_or_create_identity(client.identity)) as api:
            summary = report_session(api, session.log.work, session.log.checks)
            served = {hop.peer_id for hop in session.route}
            balances = {
                node.peer_id: api.balance(key_of(node))
                for node in swarm.nodes
                if node.process.poll() is None
            }
    assert result.unverified == ()
    assert all(check.verdict == "passed" for check in session.log.checks)
    assert all(check.beacon is not None for check in session.log.checks)
    assert summary.attestations >= 1 and summary.dropped == []
    assert all(balances[peer] > 0 for peer in served)
    report = audit(HttpSource(ledger.url))
    assert report.disputes_checked >= 1 and report.attestations_verified >= 1
