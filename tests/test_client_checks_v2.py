"""Checks v2 on the client, branch by branch, in seconds: assigned verifiers, signed verdicts,
disputes the ledger's referee decides, the head rule, and text said to be unverified.

Everything runs over the in-process network of tests/test_client_session_faults.py: fake nodes
compute the real spans, sign real receipts, and as verifiers run the node's own
:class:`~corolla.node.verifier.Verifier` and sign real verdicts; adversaries are the real ones
of ``corolla.simulations``. The ledger is :class:`FakeLedger`: real signed beacons (epochs of
one second) and disputes judged by the node's real :class:`~corolla.node.referee.Referee` over
the checkpoint (or by none). Above the network and the ledger, everything is the product's code.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_client_session_faults import FakeLedger, FakeNetwork, FakeNode

from corolla.client.check_ledger import read_calibrations
from corolla.client.generate_options import GenerateOptions
from corolla.client.generate_printer import print_result
from corolla.client.generate_runner import GenerateResult
from corolla.client.generation import (
    GenerationConfig,
    GenerationResult,
    TokenRange,
    UnverifiedText,
    generate,
)
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.remote import RemoteBackbone
from corolla.client.reporting import attestations_of
from corolla.client.runtime import BackgroundLoop
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig, Swarm
from corolla.errors import InvalidInput
from corolla.node.model.span import Span, load_span
from corolla.node.referee import Referee
from corolla.simulations.adversaries import Noise
from corolla.simulations.verifier_adversaries import (
    ColludingNode,
    ColludingVerifier,
    LyingVerifier,
    Steering,
)
from corolla.verify.assignment import assignment_seed, within_reach
from corolla.verify.identity import Identity
from corolla.verify.referee import RefereeConfig
from corolla.verify.tolerance import CALIBRATION_FILE, Calibration, save_calibrations

PROMPT = "Checks decide"
GREEDY = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
SAMPLED = GenerationConfig(
    max_new_tokens=12, stop_at_eos=False, do_sample=True, temperature=0.3, seed=11
)
"""Seeded sampling cool enough that a push under the threshold moves the draws."""
EVERY_STEP = SpotCheckConfig(rate=1.0, seed=0)
SESSIONS = 10
"""Sessions a test runs until the beacon assigns what it needs (each session has at least two
checks of the node, each assigning either of two verifiers: a miss is about 2 ** -20)."""


class Family:
    """One tiny model: its spans, client head, calibrations, referee and honest tokens."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self.head = load_head(model_dir)
        self.calibrations = read_calibrations(model_dir, self.head.model_digest)
        self.spans: dict[str, Span] = {
            blocks: load_span(model_dir, *map(int, blocks.split(":"))) for blocks in ("0:2", "2:4")
        }
        self.referee = Referee(RefereeConfig(model_dir))
        self._honest: dict[GenerationConfig, torch.Tensor] = {}

    def ids(self) -> torch.Tensor:
        return self.head.tokenizer(PROMPT, return_tensors="pt").input_ids

    def honest(self, config: GenerationConfig) -> torch.Tensor:
        if config not in self._honest:
            local = LocalBackbone.load(self.dir, [(0, 4)])
            self._honest[config] = generate(self.head, local, self.ids(), config)
        return self._honest[config]


@pytest.fixture(scope="module")
def bloom(bloom_dir: Path) -> Family:
    return Family(bloom_dir)


@pytest.fixture(scope="module")
def llama(llama_dir: Path) -> Family:
    return Family(llama_dir)


LOOSE = 1e-2
"""A threshold that leaves room to steer: the tiny models' logits move less than their honest
rounding at the default 1e-3, so a steering test calibrates a copy of the model this loose
(with a tight honest floor, as a real calibration has)."""


@pytest.fixture(scope="module", params=["bloom", "llama"])
def loose(request, model_dirs: dict[str, Path], tmp_path_factory) -> Family:
    """A copy of the tiny model whose calibration sets the threshold to LOOSE."""
    copy = tmp_path_factory.mktemp("loose") / request.param
    shutil.copytree(model_dirs[request.param], copy)
    digest = load_head(copy).model_digest
    calibration = Calibration(
        model_digest=digest,
        profile="fp32",
        checked_steps=10_000,
        honest_max=1e-5,
        honest_p999=1e-5,
        threshold_margin=LOOSE / 1e-5,
        floor_margin=10.0,
        command="tests/test_client_checks_v2.py (a loose threshold, for the steering test)",
    )
    save_calibrations(copy / CALIBRATION_FILE, [calibration])
    return Family(copy)


@pytest.fixture
def connect(tmp_path: Path) -> Iterator:
    """connect(family, network, prefer=(names...), checks=..., ledger=...) -> a client model."""
    models: list[DistributedModelForCausalLM] = []

    def make(
        family: Family,
        network: FakeNetwork,
        prefer: tuple[str, ...] = (),
        checks: SpotCheckConfig | None = EVERY_STEP,
        ledger: FakeLedger | None = None,
        client: Identity | None = None,
    ) -> DistributedModelForCausalLM:
        config = ClientConfig(
            initial_peers=("in-process",),
            identity=tmp_path / "client.key",
            prefer=frozenset(network.peer(name) for name in prefer),
        )
        loop = BackgroundLoop()
        head = family.head
        backbone = RemoteBackbone(
            Swarm(network, config),
            head.manifest,
            client or Identity.generate(),
            loop,
            checks,
            ledger,
            logits=head.logits,
        )
        model = DistributedModelForCausalLM(head, backbone, loop)
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


def _run(
    model: DistributedModelForCausalLM, config: GenerationConfig = GREEDY, **options
) -> GenerationResult:
    input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    return model.generate_result(input_ids, config, **options)


def _log(model: DistributedModelForCausalLM):
    return model.backbone.last_session.log


def _banned(model: DistributedModelForCausalLM, network: FakeNetwork) -> set[str]:
    bans = model.backbone.swarm.bans
    return {node.name for node in network.nodes.values() if bans.is_banned(node.peer_id)}


def _names(network: FakeNetwork, peers) -> list[str]:
    return [network.name_of(peer) for peer in peers]


# --------------------------------------------------------------------------- passed


def test_honest_work_is_checked_by_the_verifiers_the_beacon_assigns_and_all_of_it_verified(
    bloom, connect
):
    network = FakeNetwork(
        [
            FakeNode("a", bloom.spans["0:2"]),
            FakeNode("a2", bloom.spans["0:2"]),
            FakeNode("b", bloom.spans["2:4"]),
            FakeNode("b2", bloom.spans["2:4"]),
            FakeNode("b3", bloom.spans["2:4"]),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), bloom.referee)
    client = Identity.generate()
    model = connect(bloom, network, prefer=("a", "b"), ledger=ledger, client=client)
    result = _run(model)
    log = _log(model)
    assert torch.equal(result.tokens, bloom.honest(GREEDY))
    assert result.unverified == ()
    assert log.checks and {check.verdict for check in log.checks} == {"passed"}
    assert log.disputes == () and log.rewinds == () and _banned(model, network) == set()
    for check in log.checks:
        work, k = check.work, check.steps
        assert check.beacon is not None and check.beacon.starts_at > work.received[k - 1]
        seed = assignment_seed(
            check.beacon,
            work.node_key,
            work.session_id,
            work.hop.start,
            work.hop.end,
            k,
            work.claims[k - 1].receipt.chain_digest,
        )
        candidates = [
            n.public_key for n in network.nodes.values() if n.span.start <= work.hop.start
            and work.hop.end <= n.span.end
        ]  # fmt: skip
        assigned = within_reach(seed, candidates, (work.node_key, client.public_key), bool)
        assert check.verifier is not None and check.verifier.public_key == assigned[0]
    attestations = attestations_of(log.checks)
    assert len(attestations) == sum(len(check.records) for check in log.checks)


def test_a_verifier_that_checks_a_session_again_recomputes_only_the_new_positions(bloom, connect):
    """One verifier per span: every check of a node-session goes to it, on one check session."""
    network = FakeNetwork(
        [
            FakeNode("a", bloom.spans["0:2"]),
            FakeNode("va", bloom.spans["0:2"]),
            FakeNode("b", bloom.spans["2:4"]),
            FakeNode("vb", bloom.spans["2:4"]),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), bloom.referee)
    model = connect(bloom, network, prefer=("a", "b"), ledger=ledger)
    result = _run(model)
    assert result.unverified == ()
    log = _log(model)
    positions = {work.peer_id: work.claims[-1].request.position + work.claims[-1].request.tokens
                 for work in {check.work for check in log.checks}}  # fmt: skip
    for name, verifier in (("a", "va"), ("b", "vb")):
        checks = [check for check in log.checks if check.peer_id == network.peer(name)]
        records = [record for check in checks for record in check.records]
        assert len(checks) > 1 and len(records) > 1
        assert {check.verifier.peer_id for check in checks} == {network.peer(verifier)}
        spans = [(r.verdict.first_step, r.verdict.end_step) for r in records]
        assert spans[0][0] == 0 and all(x[1] == y[0] for x, y in itertools.pairwise(spans))
        recomputed = sum(record.verdict.recomputed_positions for record in records)
        assert recomputed == positions[network.peer(name)] == network.by_name[verifier].recomputed


# --------------------------------------------------------------------------- failed: the ruling


def test_a_cheater_the_referee_convicts_is_banned_and_rewound_and_its_verifier_is_not(
    bloom, connect
):
    network = FakeNetwork(
        [
            FakeNode("a", bloom.spans["0:2"]),
            FakeNode("cheater", bloom.spans["2:4"], behaviour=Noise(0.5)),
            FakeNode("v", bloom.spans["2:4"]),
            FakeNode("c", bloom.spans["2:4"]),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), bloom.referee)
    model = connect(bloom, network, prefer=("a", "cheater"), ledger=ledger)
    rewinds: list[int] = []
    result = _run(model, on_rewind=rewinds.append)
    log = _log(model)
    assert torch.equal(result.tokens, bloom.honest(GREEDY))
    assert rewinds and _names(network, (r.peer_id for r in log.rewinds)) == ["cheater"]
    assert [d.ruling.decision for d in log.disputes] == ["node-lied"]
    assert _names(network, (d.peer_id for d in log.disputes)) == ["cheater"]
    assert _banned(model, network) == {"cheater"}
    assert "cheater" not in _names(network, (h.peer_id for h in log_route(model)))
    (dispute,) = ledger.disputes
    assert dispute.accused == network.by_name["cheater"].public_key


def log_route(model: DistributedModelForCausalLM):
    return model.backbone.last_session.route


def test_a_lying_verifier_bans_nobody_on_its_word_and_the_referee_convicts_it(bloom, connect):
    """One honest node and one lying verifier on the span, no third peer."""
    network = FakeNetwork(
        [
            FakeNode("a", bloom.spans["0:2"]),
            FakeNode("va", bloom.spans["0:2"]),
            FakeNode("honest", bloom.spans["2:4"]),
            FakeNode("liar", bloom.spans["2:4"], behaviour=LyingVerifier()),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), bloom.referee)
    model = connect(bloom, network, prefer=("a", "honest"), ledger=ledger)
    result = _run(model)
    log = _log(model)
    assert torch.equal(result.tokens, bloom.honest(GREEDY))
    assert [d.ruling.decision for d in log.disputes] == ["verifier-lied"]
    assert log.disputes[0].ruling.lying_verifiers == (network.by_name["liar"].public_key,)
    assert _banned(model, network) == {"liar"}
    assert log.rewinds == ()
    work = log.disputes[0].work
    assert work.peer_id == network.peer("honest") and work.verified >= log.disputes[0].steps
    # The liar was the only verifier of the span: what the referee did not check is unverified.
    assert all("no verifier within reach" in r.reason for r in result.unverified)


@pytest.mark.parametrize("referee", [False, True], ids=["no-ledger", "ledger-without-referee"])
def test_an_unjudged_dispute_bans_nobody_routes_around_both_and_rewinds(bloom, connect, referee):
    network = FakeNetwork(
        [
            FakeNode("a", bloom.spans["0:2"]),
            FakeNode("cheater", bloom.spans["2:4"], behaviour=Noise(0.5)),
            FakeNode("v", bloom.spans["2:4"]),
            FakeNode("c", bloom.spans["2:4"]),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), None) if referee else None
    model = connect(bloom, network, prefer=("a", "cheater"), ledger=ledger)
    result = _run(model)
    log = _log(model)
    assert torch.equal(result.tokens, bloom.honest(GREEDY))
    (dispute,) = log.disputes
    assert dispute.ruling.decision == "unjudged" and network.name_of(dispute.peer_id) == "cheater"
    assert _banned(model, network) == set()
    assert _names(network, (r.peer_id for r in log.rewinds)) == ["cheater"]
    used = set(_names(network, (h.peer_id for h in log_route(model))))
    assert "cheater" not in used and network.name_of(dispute.verifier.peer_id) not in used
    # The one node left on the span has no verifier this session still uses.
    assert result.unverified and all(
        "no verifier within reach" in r.reason for r in result.unverified
    )


def test_a_verifier_that_does_not_answer_is_passed_over_and_never_banned(bloom, connect):
    network = FakeNetwork(
        [
            FakeNode("a", bloom.spans["0:2"]),
            FakeNode("va", bloom.spans["0:2"]),
            FakeNode("b", bloom.spans["2:4"]),
            FakeNode("mute", bloom.spans["2:4"], mute_checks=True),
            FakeNode("v", bloom.spans["2:4"]),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), bloom.referee)
    checks = SpotCheckConfig(rate=1.0, seed=0, timeout=1.0)
    model = connect(bloom, network, prefer=("a", "b"), ledger=ledger, checks=checks)
    mute = network.peer("mute")
    for _ in range(SESSIONS):  # the beacon ranks the mute verifier first about half of the time
        result = _run(model)
        log = _log(model)
        skipped = [c for c in log.checks if any(s.startswith(mute) for s in c.skipped)]
        if skipped:
            break
    assert skipped, f"the mute verifier was never assigned first in {SESSIONS} sessions"
    assert torch.equal(result.tokens, bloom.honest(GREEDY))
    assert {c.verdict for c in log.checks} == {"passed"} and result.unverified == ()
    assert all(network.name_of(c.verifier.peer_id) == "v" for c in skipped)
    assert all("did not answer" in s for c in skipped for s in c.skipped)
    assert _banned(model, network) == set()


# --------------------------------------------------------------------------- collusion


def test_a_colluding_pair_is_caught_as_soon_as_the_honest_verifier_is_assigned(bloom, connect):
    """Until the beacon assigns the honest verifier, the accomplice passes everything (those
    are the assignment's odds); the session in which it is assigned returns honest text, and
    the referee convicts the node and every accomplice verdict the dispute holds."""
    colluder = Identity.generate()
    network = FakeNetwork(
        [
            FakeNode("c", bloom.spans["0:2"], ColludingNode(seed=3), identity=colluder),
            FakeNode("accomplice", bloom.spans["0:2"], ColludingVerifier(colluder.public_key)),
            FakeNode("honest", bloom.spans["0:2"]),
            FakeNode("b", bloom.spans["2:4"]),
            FakeNode("vb", bloom.spans["2:4"]),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), bloom.referee)
    model = connect(bloom, network, prefer=("c", "b"), ledger=ledger)
    honest, accomplice = network.peer("honest"), network.by_name["accomplice"].public_key
    for _ in range(SESSIONS):
        result = _run(model)
        log = _log(model)
        of_c = [check for check in log.checks if check.peer_id == network.peer("c")]
        if any(check.verifier is not None and check.verifier.peer_id == honest for check in of_c):
            break
        assert all(network.name_of(check.verifier.peer_id) == "accomplice" for check in of_c)
    else:
        pytest.fail(f"the honest verifier was never assigned in {SESSIONS} sessions")
    assert torch.equal(result.tokens, bloom.honest(GREEDY))
    (convicted,) = [d for d in log.disputes if d.ruling.decision == "node-lied"]
    assert network.name_of(convicted.peer_id) == "c"
    assert network.name_of(convicted.verifier.peer_id) == "honest"
    held = {record.verdict.verifier_key for record in convicted.dispute.checks}
    assert (accomplice in held) == (accomplice in convicted.ruling.lying_verifiers)
    banned = _banned(model, network)
    assert "c" in banned and "honest" not in banned
    assert ("accomplice" in banned) == (accomplice in held)


# --------------------------------------------------------------------------- the head rule


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_a_steering_node_changes_no_token_of_a_checked_session(loose, connect, config):
    family = loose

    def network() -> FakeNetwork:
        spans, calibrations = family.spans, family.calibrations
        return FakeNetwork(
            [
                FakeNode("a", spans["0:2"], calibrations=calibrations),
                FakeNode("steer", spans["2:4"], Steering(family.dir), calibrations=calibrations),
                FakeNode("v", spans["2:4"], calibrations=calibrations),
                FakeNode("c", spans["2:4"], calibrations=calibrations),
            ]
        )

    unchecked = connect(family, network(), prefer=("a", "steer"), checks=None)
    steered = _run(unchecked, config)
    assert not torch.equal(steered.tokens, family.honest(config)), "steering changed nothing"
    assert steered.unverified == (TokenRange(0, config.max_new_tokens, "spot-checks are off"),)

    swarm = network()
    ledger = FakeLedger(
        list(swarm.nodes.values()), family.referee, calibrations=family.calibrations
    )
    model = connect(family, swarm, prefer=("a", "steer"), ledger=ledger)
    result = _run(model, config)
    log = _log(model)
    assert "failed" not in {check.verdict for check in log.checks}  # under the threshold
    assert torch.equal(result.tokens, family.honest(config))
    assert log.checks and log.rewinds
    assert any("head rule" in d.trigger for d in log.disputes)
    assert any(d.ruling.decision == "node-lied" for d in log.disputes)
    assert _banned(model, swarm) == {"steer"}
    assert family.calibrations["fp32"].threshold == pytest.approx(LOOSE)


# --------------------------------------------------------------------------- unverified text


def test_without_a_verifier_the_result_names_the_unverified_tokens_and_require_checks_fails(
    bloom, connect
):
    network = FakeNetwork([FakeNode("a", bloom.spans["0:2"]), FakeNode("b", bloom.spans["2:4"])])
    model = connect(bloom, network)
    result = _run(model)
    assert torch.equal(result.tokens, bloom.honest(GREEDY))
    (whole,) = result.unverified
    assert (whole.start, whole.end) == (0, GREEDY.max_new_tokens)
    assert "no verifier within reach" in whole.reason
    assert _log(model).unverified == result.unverified
    with pytest.raises(UnverifiedText, match="no verifier within reach") as raised:
        _run(model, require_checks=True)
    assert raised.value.ranges == result.unverified


def test_generate_prints_one_line_naming_the_unverified_tokens_and_json_has_a_field(bloom, capsys):
    unverified = (TokenRange(0, 3, "no verifier within reach"), TokenRange(5, 6, "x"))
    result = GenerateResult(
        bloom.head, bloom.ids(), bloom.honest(GREEDY)[0], 0.1, 0.2, None, unverified
    )
    print_result(result, as_json=False, prompt=PROMPT)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "unverified" in line]
    assert lines == ["unverified: tokens 0-2: no verifier within reach; token 5: x (no spot-check "
                     "covered their steps)"]  # fmt: skip
    print_result(result, as_json=True, prompt=PROMPT)
    output = json.loads(capsys.readouterr().out)
    assert output["unverified"] == [
        {"tokens": [0, 3], "reason": "no verifier within reach"},
        {"tokens": [5, 6], "reason": "x"},
    ]


def test_require_checks_without_spot_checks_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(InvalidInput, match="--require-checks needs spot-checks"):
        GenerateOptions(
            prompt="x",
            model=tmp_path,
            initial_peers=("/ip4/127.0.0.1/tcp/1",),
            check_rate=0.0,
            require_checks=True,
        )
