"""Checks v2 against real node processes and a real ledger with its referee (issue 13).

- A colluding pair (one operator, two identities: a node that corrupts its outputs and a
  verifier that passes them) beside one honest verifier: the text is honest in the session
  where the beacon assigns the honest verifier, the referee convicts the node (and the
  accomplice whenever its verdicts are in the dispute), and the honest verifier is never banned.
- One honest node and one lying verifier on a span, no third peer: the honest node is not
  banned on the liar's word; the referee convicts the liar; the text is the honest one and the
  node keeps its credit.
- A steering node (under the threshold, towards the runner-up token) changes no token of a
  session that had a check, greedy and seeded sampling, both families.

The ledger's beacon epochs are 2 s long; the nodes declare what they serve to it themselves
(:func:`wait_declared` waits for that), and the checks start in the next epoch.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from swarm_fixtures import NodeProcess, Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.reporting import report_session
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.ledger.api.client import LedgerClient
from corolla.node.model.checkpoint import parse_span
from corolla.simulations.ledger_process import LedgerProcess
from corolla.verify.identity import load_or_create_identity
from corolla.verify.tolerance import CALIBRATION_FILE, Calibration, save_calibrations

PROMPT = "Checks decide"
GREEDY = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
SAMPLED = GenerationConfig(
    max_new_tokens=12, stop_at_eos=False, do_sample=True, temperature=0.3, seed=11
)
PERIOD = 2
"""Seconds per beacon epoch."""
DECLARE_TIMEOUT = 60.0
"""Seconds a node started with ``--ledger`` has to declare what it serves."""
SESSIONS = 10
"""Sessions the collusion test runs until the beacon assigns the honest verifier."""
LOOSE = 1e-2
"""The threshold of the steering test's calibrated model copies (see test_client_checks_v2)."""


def start_ledger(root: Path, referee_model: Path) -> LedgerProcess:
    return LedgerProcess(
        root / "ledger.db",
        root / "ledger.key",
        extra=["--referee-model", str(referee_model), "--beacon-period-s", str(PERIOD)],
    )


def wait_declared(ledger: str, model_dir: Path, nodes: list[tuple[NodeProcess, str]]) -> None:
    """Wait until every node (started with ``--ledger``) has declared its blocks (fp32) to the
    ledger before the current beacon epoch began: every check from now on counts it."""
    digest = load_head(model_dir).model_digest
    deadline = time.monotonic() + DECLARE_TIMEOUT
    with LedgerClient(ledger) as api:
        for node, blocks in nodes:
            start, end = parse_span(blocks)
            while key_of(node) not in api.servers(
                digest, start, end, "fp32", int(time.time() // PERIOD)
            ):
                assert time.monotonic() < deadline, f"{node.name} never declared {blocks}"
                time.sleep(0.2)


def key_of(node: NodeProcess) -> bytes:
    return load_or_create_identity(node.identity).public_key


def honest_tokens(model_dir: Path, config: GenerationConfig) -> torch.Tensor:
    head = load_head(model_dir)
    input_ids = head.tokenizer(PROMPT, return_tensors="pt").input_ids
    return generate(head, LocalBackbone.load(model_dir, [(0, 4)]), input_ids, config)


def client(swarm: Swarm, key: Path, prefer: set[str]) -> ClientConfig:
    return ClientConfig(
        initial_peers=tuple(swarm.initial_peers),
        identity=key,
        step_timeout=30.0,
        prefer=frozenset(prefer),
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Swarm]]:
    with Swarm(tmp_path / "nodes") as swarm:
        yield tmp_path, swarm


def test_a_colluding_pair_is_caught_when_the_beacon_assigns_the_honest_verifier(
    bloom_dir: Path, world
):
    root, swarm = world
    with start_ledger(root, bloom_dir) as ledger:
        b = swarm.start(bloom_dir, blocks="2:4", extra_args=["--ledger", ledger.url])
        vb = swarm.start(bloom_dir, blocks="2:4", extra_args=["--ledger", ledger.url])
        c = swarm.start(
            bloom_dir, blocks="0:2", adversary="colluding-node",
            extra_args=["--seed", "7", "--ledger", ledger.url],
        )  # fmt: skip
        accomplice = swarm.start(
            bloom_dir, blocks="0:2", adversary="colluding-verifier",
            extra_args=["--accomplice", key_of(c).hex(), "--ledger", ledger.url],
        )  # fmt: skip
        honest = swarm.start(bloom_dir, blocks="0:2", extra_args=["--ledger", ledger.url])
        nodes = [(b, "2:4"), (vb, "2:4"), (c, "0:2"), (accomplice, "0:2"), (honest, "0:2")]
        wait_declared(ledger.url, bloom_dir, nodes)
        key = root / "client.key"
        config = client(swarm, key, {c.peer_id, b.peer_id})
        checks = SpotCheckConfig(rate=1.0, seed=1)
        with DistributedModelForCausalLM.from_pretrained(
            bloom_dir, config=config, checks=checks, ledger=ledger.url
        ) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            for _ in range(SESSIONS):
                result = model.generate_result(input_ids, GREEDY)
                log = model.backbone.last_session.log
                with LedgerClient(ledger.url, load_or_create_identity(key)) as api:
                    report_session(api, log.work, log.checks)
                of_c = [check for check in log.checks if check.peer_id == c.peer_id]
                verifiers = {check.verifier.peer_id for check in of_c if check.verifier}
                if honest.peer_id in verifiers:
                    break
                assert verifiers <= {accomplice.peer_id}
            else:
                pytest.fail(f"the honest verifier was never assigned in {SESSIONS} sessions")
            bans = model.backbone.swarm.bans
        with LedgerClient(ledger.url) as api:
            accounts = {node.peer_id: api.account(key_of(node)) for node, _ in nodes}
    assert torch.equal(result.tokens, honest_tokens(bloom_dir, GREEDY))
    (convicted,) = [d for d in log.disputes if d.ruling.decision == "node-lied"]
    assert convicted.peer_id == c.peer_id and convicted.verifier.peer_id == honest.peer_id
    assert bans.is_banned(c.peer_id) and not bans.is_banned(honest.peer_id)
    assert accounts[c.peer_id].slashed and accounts[c.peer_id].balance == 0
    assert not accounts[honest.peer_id].slashed
    held = {record.verdict.verifier_key for record in convicted.dispute.checks}
    if key_of(accomplice) in held:  # its verdicts were evidence: convicted on them
        assert key_of(accomplice) in convicted.ruling.lying_verifiers
        assert accounts[accomplice.peer_id].slashed and accounts[accomplice.peer_id].balance == 0


def test_a_lying_verifier_with_no_third_peer_is_convicted_and_the_node_keeps_its_credit(
    bloom_dir: Path, world
):
    root, swarm = world
    with start_ledger(root, bloom_dir) as ledger:
        a = swarm.start(bloom_dir, blocks="0:2", extra_args=["--ledger", ledger.url])
        va = swarm.start(bloom_dir, blocks="0:2", extra_args=["--ledger", ledger.url])
        node = swarm.start(bloom_dir, blocks="2:4", extra_args=["--ledger", ledger.url])
        liar = swarm.start(
            bloom_dir, blocks="2:4", adversary="lying-verifier",
            extra_args=["--ledger", ledger.url],
        )  # fmt: skip
        wait_declared(
            ledger.url, bloom_dir, [(a, "0:2"), (va, "0:2"), (node, "2:4"), (liar, "2:4")]
        )
        key = root / "client.key"
        with DistributedModelForCausalLM.from_pretrained(
            bloom_dir,
            config=client(swarm, key, {a.peer_id, node.peer_id}),
            checks=SpotCheckConfig(rate=1.0, seed=2),
            ledger=ledger.url,
        ) as model:
            input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
            result = model.generate_result(input_ids, GREEDY)
            log = model.backbone.last_session.log
            bans = model.backbone.swarm.bans
            with LedgerClient(ledger.url, load_or_create_identity(key)) as api:
                report_session(api, log.work, log.checks)
                node_account = api.account(key_of(node))
                liar_account = api.account(key_of(liar))
    assert torch.equal(result.tokens, honest_tokens(bloom_dir, GREEDY))
    (dispute,) = log.disputes
    assert dispute.peer_id == node.peer_id and dispute.verifier.peer_id == liar.peer_id
    assert dispute.ruling.decision == "verifier-lied" and dispute.ruling.judge == "referee"
    assert dispute.ruling.lying_verifiers == (key_of(liar),)
    assert not bans.is_banned(node.peer_id) and bans.is_banned(liar.peer_id)
    assert node.peer_id in {hop.peer_id for hop in model.backbone.last_session.route}
    assert log.rewinds == ()
    assert liar_account is not None and liar_account.slashed and liar_account.balance == 0
    assert node_account is not None and not node_account.slashed and node_account.balance > 0


@pytest.fixture(params=["bloom", "llama"])
def loose_model(request, model_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the tiny model calibrated with a LOOSE threshold (room to steer under it)."""
    copy = tmp_path / f"loose-{request.param}"
    shutil.copytree(model_dirs[request.param], copy)
    calibration = Calibration(
        model_digest=load_head(copy).model_digest,
        profile="fp32",
        checked_steps=10_000,
        honest_max=1e-5,
        honest_p999=1e-5,
        threshold_margin=LOOSE / 1e-5,
        floor_margin=10.0,
        command="tests/test_client_checks_v2_live.py (a loose threshold, for the steering test)",
    )
    save_calibrations(copy / CALIBRATION_FILE, [calibration])
    return copy


def test_a_steering_node_changes_no_token_of_a_session_that_had_a_check(loose_model, world):
    root, swarm = world
    with start_ledger(root, loose_model) as ledger:
        a = swarm.start(loose_model, blocks="0:2", extra_args=["--ledger", ledger.url])
        steer = swarm.start(
            loose_model, blocks="2:4", adversary="steering", extra_args=["--ledger", ledger.url]
        )
        v = swarm.start(loose_model, blocks="2:4", extra_args=["--ledger", ledger.url])
        c = swarm.start(loose_model, blocks="2:4", extra_args=["--ledger", ledger.url])
        wait_declared(ledger.url, loose_model, [(a, "0:2"), (steer, "2:4"), (v, "2:4"), (c, "2:4")])
        key = root / "client.key"
        prefer = {a.peer_id, steer.peer_id}
        for config in (GREEDY, SAMPLED):
            honest = honest_tokens(loose_model, config)
            with DistributedModelForCausalLM.from_pretrained(
                loose_model, config=client(swarm, key, prefer), checks=None
            ) as unchecked:
                input_ids = unchecked.tokenizer(PROMPT, return_tensors="pt").input_ids
                steered = unchecked.generate(input_ids, config)
            assert not torch.equal(steered, honest), f"steering changed nothing ({config})"
            with DistributedModelForCausalLM.from_pretrained(
                loose_model,
                config=client(swarm, key, prefer),
                checks=SpotCheckConfig(rate=0.5, seed=4),
                ledger=ledger.url,
            ) as model:
                result = model.generate_result(input_ids, config)
                log = model.backbone.last_session.log
                banned = model.backbone.swarm.bans.is_banned(steer.peer_id)
            assert torch.equal(result.tokens, honest), config
            assert log.checks and log.rewinds
            convicted = [d for d in log.disputes if d.ruling.decision == "node-lied"]
            assert convicted and all(d.peer_id == steer.peer_id for d in convicted)
            assert any("head rule" in d.trigger for d in convicted)
            assert banned
