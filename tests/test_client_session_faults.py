"""Failover and rewinds against scripted faults, in milliseconds: the client's real session,
routing, bans, spot-checks and receipt checks over an in-process network.

The network is :class:`FakeNetwork`, a :class:`~corolla.client.transport.SwarmTransport` whose
nodes compute the real span (``load_span``) through a node :class:`Behaviour` (honest, or an
adversary from ``corolla.simulations``) and sign real receipts; as verifiers they run the node's
own :class:`~corolla.node.verifier.Verifier` on a real node
:class:`~corolla.node.sessions.Session` and sign real verdicts. A script makes a node die or
hang at its k-th step, or never answer a check. Everything above the transport is the product's
code. The same faults against real node processes are in tests/test_swarm_failover.py; the
checks' branches are in tests/test_client_checks_v2.py, which uses this network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla.client.check_ledger import CheckLedger
from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import ClientHead, load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.remote import RemoteBackbone
from corolla.client.runtime import BackgroundLoop
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig, Swarm
from corolla.errors import InvalidInput, LedgerRefused, NodeUnavailable, RouteUnavailable
from corolla.ledger.api.checks import DisputeOutcome
from corolla.node.behaviour import Behaviour
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.messages import (
    CheckMessage,
    CheckOutput,
    NodeInfo,
    OpenSession,
    SessionOpened,
    StepMessage,
    StepOutput,
)
from corolla.node.protocol.records import NodeState, ServerRecord, peer_id_of, sign_record
from corolla.node.referee import Referee
from corolla.node.sessions import Session
from corolla.node.step_checks import check_next_step, check_request, check_session_owner
from corolla.node.verifier import Verifier
from corolla.simulations.adversaries import BadDigest, Noise, WrongKey
from corolla.verify.beacon import Beacon, epoch_of, sign_beacon
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.disputes import Dispute, Judgment
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, verify_request
from corolla.verify.referee import RefereeConfig
from corolla.verify.tolerance import Calibration
from corolla.version import __version__

PROMPT = "Scripted faults"
CONFIG = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
STEP_TIMEOUT = 30.0
"""Generous: an honest step must never time out, however loaded the machine."""
HANG_TIMEOUT = 2.0
"""For the tests of a node that never answers (what the session waits before giving up)."""


# --------------------------------------------------------------------------- the network


class FakeNode:
    """A node in this process: real span, real receipts and verdicts, scripted faults."""

    def __init__(
        self,
        name: str,
        span: Span,
        behaviour: Behaviour | None = None,
        die_at: int | None = None,
        hang_at: int | None = None,
        ping: float = 0.0,
        mute_checks: bool = False,
        identity: Identity | None = None,
        calibrations: dict[str, Calibration] | None = None,
    ) -> None:
        self.name = name
        self.span = span
        self.behaviour = behaviour or Behaviour()
        self.behaviour.attach(span)
        self.identity = identity or Identity.generate()
        self.peer_id = peer_id_of(self.identity.public_key).to_base58()
        self.verifier = Verifier(self.identity, span, calibrations)
        self.die_at = die_at
        self.hang_at = hang_at
        """Die (or never answer) when asked for this node's k-th session step (0-based)."""
        self.ping = ping
        """Seconds its ping takes (a far node is routed through last)."""
        self.mute_checks = mute_checks
        """Accept check steps and never answer them."""
        self.steps = 0
        self.checks = 0
        self.recomputed = 0
        """Positions this node recomputed as a verifier."""
        self.dead = False

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    def record(self) -> ServerRecord:
        unsigned = ServerRecord(
            peer_id=self.peer_id,
            public_key=self.identity.public_key,
            model_digest=self.span.model_digest,
            span_digest=self.span.digest,
            start=self.span.start,
            end=self.span.end,
            throughput=1000.0,
            cache_tokens_free=4096,
            quant="none",
            dtype="float32",
            state=NodeState.ONLINE,
            version=__version__,
            expires_at=1e12,
        )
        return sign_record(self.identity, unsigned)

    def check_alive(self) -> None:
        if self.dead:
            raise NodeUnavailable(f"cannot reach node {self.name}", self.peer_id)

    def compute(
        self, request: StepRequest, hidden: torch.Tensor, session: Session | None
    ) -> tuple[Receipt, torch.Tensor, torch.Tensor]:
        """The forward pass and the receipt, as the node's service makes them: (receipt, the
        output it names, the tensor sent back)."""
        span = (
            session.span if session is not None else self.span.subspan(request.start, request.end)
        )
        behaviour = self.behaviour
        computed = behaviour.compute(request, span, hidden, session.cache if session else None)
        output = behaviour.output(request.step, request, hidden, computed)
        previous = session.chain if session is not None else GENESIS_CHAIN
        receipt = behaviour.sign_receipt(self.identity, request, tensor_digest(output), previous)
        return receipt, output, behaviour.sent(request.step, request, output)

    async def step(self, request: StepRequest, hidden: torch.Tensor, session: Session | None):
        self.check_alive()
        if session is not None:
            index, self.steps = self.steps, self.steps + 1
            if index == self.die_at:
                self.dead = True
                raise NodeUnavailable(f"node {self.name} ended the stream", self.peer_id)
            if index == self.hang_at:
                await asyncio.Event().wait()  # accepted the step, never answers
        verify_request(request)
        receipt, _, sent = self.compute(request, hidden, session)
        return StepOutput(receipt, sent)

    async def check(self, check: CheckMessage, session: Session) -> CheckOutput:
        """A check step, as the node's service runs one (the same checks, in the same order)."""
        self.check_alive()
        if self.mute_checks:
            await asyncio.Event().wait()
        request, hidden = check.request, check.hidden
        verify_request(request)
        check_session_owner(session, request)
        batch, new = check_request(request, hidden, session.span)
        check_next_step(session, request, batch, new)
        self.verifier.admit(session, check)
        self.verifier.check_claims(check)
        receipt, output, sent = self.compute(request, hidden, session)
        verdict = self.behaviour.judge(self.identity, self.verifier.verdict(check, receipt, output))
        reply = CheckOutput(receipt, sent, verdict)
        session.advance(request, reply, receipt.chain_digest)
        session.mirror = self.verifier.mirror_after(check)
        self.checks += 1
        self.recomputed += request.tokens
        return reply


class FakeStream:
    """One inference session on a FakeNode, as `InferenceStream` is one on a real node."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.session: Session | None = None

    async def open(self, request: OpenSession, timeout: float) -> SessionOpened:
        self.node.check_alive()
        span = self.node.span.subspan(request.start, request.end)
        self.session = Session(
            request.session_id,
            request.client_key,
            request.batch_size,
            request.max_length,
            span,
            span.new_cache(request.batch_size),
        )
        return SessionOpened(request.session_id, request.batch_size, request.max_length, 4096)

    def _open_session(self) -> Session:
        if self.session is None:
            raise NodeUnavailable("step before open", self.node.peer_id)
        return self.session

    async def step(self, step: StepMessage, timeout: float) -> StepOutput:
        session = self._open_session()
        if session.mirror is not None:
            raise InvalidInput("this is a check session: it takes only check steps")
        reply = await self.node.step(step.request, step.hidden, session)
        session.advance(step.request, reply, reply.receipt.chain_digest)
        return reply

    async def check(self, check: CheckMessage, timeout: float) -> CheckOutput:
        return await self.node.check(check, self._open_session())

    async def close(self) -> None:
        self.session = None

    async def abort(self) -> None:
        self.session = None


class FakeNetwork:
    """The swarm's records, pings, one-shot forwards and streams, all in this process."""

    def __init__(self, nodes: list[FakeNode]) -> None:
        self.nodes = {node.peer_id: node for node in nodes}
        self.by_name = {node.name: node for node in nodes}

    def peer(self, name: str) -> str:
        return self.by_name[name].peer_id

    def name_of(self, peer_id: str) -> str:
        return self.nodes[peer_id].name

    async def fetch_records(
        self, model_digest: bytes, num_blocks: int
    ) -> list[dict[str, ServerRecord]]:
        # A dead node's record stays in the DHT until it expires, as in a real swarm.
        records = [node.record() for node in self.nodes.values()]
        return [{r.peer_id: r for r in records if block in r.blocks} for block in range(num_blocks)]

    async def info(self, peer_id: str, timeout: float) -> NodeInfo:
        node = self.nodes[peer_id]
        node.check_alive()
        await asyncio.sleep(node.ping)
        span = node.span
        return NodeInfo(
            peer_id=peer_id,
            public_key=node.identity.public_key,
            model_digest=span.model_digest,
            span_digest=span.digest,
            start=span.start,
            end=span.end,
            family=span.family.name,
            hidden_size=span.hidden_size,
            dtype="float32",
            quant="none",
            max_length=span.max_length,
            throughput=1000.0,
            cache_tokens_total=4096,
            cache_tokens_free=4096,
            sessions=0,
            state=NodeState.ONLINE,
            version=__version__,
        )

    async def forward(self, peer_id: str, step: StepMessage, timeout: float) -> StepOutput:
        return await self.nodes[peer_id].step(step.request, step.hidden, None)

    def open_stream(self, peer_id: str) -> FakeStream:
        return FakeStream(self.nodes[peer_id])

    async def shutdown(self) -> None:
        return None


class FakeLedger:
    """The ledger's side of checks v2 in this process: a real signed beacon per epoch of
    ``period`` seconds, the nodes' declarations, and disputes judged by a real referee (the
    node's :class:`~corolla.node.referee.Referee` over the checkpoint), or by none."""

    def __init__(
        self,
        declared: list[FakeNode],
        referee: Referee | None,
        period: int = 1,
        calibrations: dict[str, Calibration] | None = None,
    ) -> None:
        self.identity = Identity.generate()
        self.period = period
        self.declared = declared
        self.referee = referee
        self.published = calibrations or {}
        self.disputes: list[Dispute] = []
        self.outcomes: list[DisputeOutcome] = []

    async def beacon(self, epoch: int | None = None) -> Beacon:
        now = epoch_of(time.time(), self.period)
        if epoch is not None and epoch > now:
            raise LedgerRefused(f"epoch {epoch} has not begun", 425)
        return sign_beacon(
            self.identity, "fake-ledger", self.period, now if epoch is None else epoch
        )

    async def servers(
        self, model_digest: bytes, start: int, end: int, profile: str, before_epoch: int
    ) -> list[bytes]:
        return [
            node.public_key
            for node in self.declared
            if node.span.model_digest == model_digest
            and node.span.start <= start
            and end <= node.span.end
            and profile == "fp32"
        ]

    async def account(self, key: bytes) -> None:
        return None  # nobody is slashed here: the client bans whom the referee convicts

    async def info(self) -> dict[str, object]:
        return {"rules": {"min_verifier_reputation": 0}}

    async def calibrations(self, model_digest: bytes) -> dict[str, Calibration]:
        return {p: c for p, c in self.published.items() if c.model_digest == model_digest}

    async def submit_dispute(self, dispute: Dispute) -> DisputeOutcome:
        self.disputes.append(dispute)
        judgment = None
        if self.referee is not None:
            judgment = await asyncio.to_thread(self.referee.judge, dispute)
        if not isinstance(judgment, Judgment):
            outcome = DisputeOutcome(
                judged=False, node_lied=False, lying_verifiers=(), judge="none",
                reason="no referee", accused=dispute.accused, dispute_digest=bytes(32),
                credited_units=0, entries=(),
            )  # fmt: skip
        else:
            outcome = DisputeOutcome(
                judged=True,
                node_lied=judgment.node_lied,
                lying_verifiers=tuple(key for key, _ in judgment.lying_verifiers),
                judge="referee",
                reason=judgment.node_reason,
                accused=dispute.accused,
                dispute_digest=bytes(32),
                credited_units=0,
                entries=(),
            )
        self.outcomes.append(outcome)
        return outcome


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def spans(bloom_dir: Path) -> dict[str, Span]:
    """The tiny BLOOM's spans, loaded once and shared by the fake nodes (caches are per session)."""
    return {blocks: load_span(bloom_dir, *map(int, blocks.split(":"))) for blocks in ("0:2", "2:4")}


@pytest.fixture(scope="module")
def head(bloom_dir: Path) -> ClientHead:
    return load_head(bloom_dir)


@pytest.fixture(scope="module")
def honest_tokens(bloom_dir: Path, head: ClientHead) -> torch.Tensor:
    input_ids = head.tokenizer(PROMPT, return_tensors="pt").input_ids
    return generate(head, LocalBackbone.load(bloom_dir, [(0, 4)]), input_ids, CONFIG)


@pytest.fixture
def connect(head: ClientHead, tmp_path: Path) -> Iterator:
    """connect(network, prefer=(names...), ...) -> a client model over the fake network."""
    models: list[DistributedModelForCausalLM] = []

    def make(
        network: FakeNetwork,
        prefer: tuple[str, ...] = (),
        checks: SpotCheckConfig | None = None,
        verify_receipts: bool = True,
        max_failovers: int = 4,
        step_timeout: float = STEP_TIMEOUT,
        ledger: CheckLedger | None = None,
        client: Identity | None = None,
        model_head: ClientHead | None = None,
    ) -> DistributedModelForCausalLM:
        config = ClientConfig(
            initial_peers=("in-process",),
            identity=tmp_path / "client.key",
            step_timeout=step_timeout,
            prefer=frozenset(network.peer(name) for name in prefer),
            verify_receipts=verify_receipts,
            max_failovers=max_failovers,
        )
        loop = BackgroundLoop()
        swarm = Swarm(network, config)
        used = model_head or head
        identity = client or Identity.generate()
        backbone = RemoteBackbone(
            swarm, used.manifest, identity, loop, checks, ledger, logits=used.logits
        )
        model = DistributedModelForCausalLM(used, backbone, loop)
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


def _generate(model: DistributedModelForCausalLM) -> torch.Tensor:
    input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    return model.generate(input_ids, CONFIG)


def _banned(model: DistributedModelForCausalLM, network: FakeNetwork) -> set[str]:
    bans = model.backbone.swarm.bans
    return {node.name for node in network.nodes.values() if bans.is_banned(node.peer_id)}


def _failed(model: DistributedModelForCausalLM, network: FakeNetwork) -> list[str]:
    session = model.backbone.last_session
    names = {node.peer_id: node.name for node in network.nodes.values()}
    return [names[failover.peer_id] for failover in session.log.failovers]


def _worked(model: DistributedModelForCausalLM, network: FakeNetwork) -> set[str]:
    names = {node.peer_id: node.name for node in network.nodes.values()}
    return {names[record.peer_id] for record in model.last_work}


# --------------------------------------------------------------------------- tests


def test_without_faults_the_session_equals_local_generation_and_bans_nobody(
    spans, connect, honest_tokens
):
    network = FakeNetwork(
        [FakeNode("a", spans["0:2"]), FakeNode("b", spans["2:4"]), FakeNode("c", spans["2:4"])]
    )
    model = connect(network, prefer=("a", "b"))
    assert torch.equal(_generate(model), honest_tokens)
    assert _worked(model, network) == {"a", "b"}
    assert len(model.last_work) == 2 * CONFIG.max_new_tokens
    assert _banned(model, network) == set()
    assert model.backbone.last_session.log.failovers == ()


@pytest.mark.parametrize(
    ("victim", "step"),
    [("b", 0), ("b", 5), ("a", 5), ("a", CONFIG.max_new_tokens - 1)],
    ids=["last-hop-prefill", "last-hop-step-5", "first-hop-step-5", "first-hop-last-step"],
)
def test_a_node_that_dies_at_step_k_is_replaced_and_the_tokens_are_unchanged(
    spans, connect, honest_tokens, victim, step
):
    network = FakeNetwork(
        [
            FakeNode("a", spans["0:2"], die_at=step if victim == "a" else None),
            FakeNode("a2", spans["0:2"]),
            FakeNode("b", spans["2:4"], die_at=step if victim == "b" else None),
            FakeNode("b2", spans["2:4"]),
        ]
    )
    model = connect(network, prefer=("a", "b"))
    assert torch.equal(_generate(model), honest_tokens)
    assert _failed(model, network) == [victim]
    assert _banned(model, network) == {victim}
    assert network.peer(victim + "2") in {h.peer_id for h in model.backbone.last_session.route}


def test_a_node_that_accepts_a_step_and_never_answers_times_out_and_is_replaced(
    spans, connect, honest_tokens
):
    network = FakeNetwork(
        [
            FakeNode("a", spans["0:2"]),
            FakeNode("b", spans["2:4"], hang_at=4),
            FakeNode("c", spans["2:4"]),
        ]
    )
    model = connect(network, prefer=("a", "b"), step_timeout=HANG_TIMEOUT)
    assert torch.equal(_generate(model), honest_tokens)
    assert _failed(model, network) == ["b"]
    (failover,) = model.backbone.last_session.log.failovers
    assert "NodeUnavailable" in failover.reason
    assert f"did not answer step 4 within {HANG_TIMEOUT} s" in failover.reason
    assert _banned(model, network) == {"b"}


@pytest.mark.parametrize(
    ("behaviour", "error"), [(WrongKey, "BadSignature"), (BadDigest, "BadReceipt")]
)
def test_a_bad_receipt_is_refused_in_any_environment_and_the_node_is_replaced(
    spans, connect, honest_tokens, monkeypatch, behaviour, error
):
    monkeypatch.setenv("COROLLA_BENCHMARK_UNSIGNED", "1")  # the old switch: no effect
    network = FakeNetwork(
        [
            FakeNode("a", spans["0:2"]),
            FakeNode("liar", spans["2:4"], behaviour=behaviour()),
            FakeNode("c", spans["2:4"]),
        ]
    )
    model = connect(network, prefer=("a", "liar"))
    assert torch.equal(_generate(model), honest_tokens)
    assert _failed(model, network) == ["liar"]
    assert error in model.backbone.last_session.log.failovers[0].reason
    assert _banned(model, network) == {"liar"}
    assert _worked(model, network) == {"a", "c"}


def test_only_the_client_config_turns_receipt_checks_off(spans, connect, honest_tokens):
    """verify_receipts=False (benchmarks only) takes the wrong-key node's outputs unchecked."""
    network = FakeNetwork(
        [
            FakeNode("a", spans["0:2"]),
            FakeNode("liar", spans["2:4"], behaviour=WrongKey()),
            FakeNode("c", spans["2:4"]),
        ]
    )
    model = connect(network, prefer=("a", "liar"), verify_receipts=False)
    assert torch.equal(_generate(model), honest_tokens)  # the liar computed honestly
    assert _failed(model, network) == []
    assert _worked(model, network) == {"a", "liar"}


def test_two_failures_in_one_session_are_both_replaced(spans, connect, honest_tokens):
    network = FakeNetwork(
        [
            FakeNode("a", spans["0:2"]),
            FakeNode("b", spans["2:4"], die_at=3),
            FakeNode("c", spans["2:4"], hang_at=2),  # the replacement fails too
            FakeNode("d", spans["2:4"], ping=0.1),  # far: the last choice
        ]
    )
    model = connect(network, prefer=("a", "b"), step_timeout=HANG_TIMEOUT)
    assert torch.equal(_generate(model), honest_tokens)
    assert _failed(model, network) == ["b", "c"]
    assert _banned(model, network) == {"b", "c"}
    assert [hop.peer_id for hop in model.backbone.last_session.route] == [
        network.peer("a"),
        network.peer("d"),
    ]


def test_more_failures_than_the_budget_end_in_a_clear_error_naming_them(spans, connect):
    network = FakeNetwork(
        [
            FakeNode("a", spans["0:2"]),
            FakeNode("b", spans["2:4"], die_at=2),
            FakeNode("c", spans["2:4"], die_at=1),
        ]
    )
    model = connect(network, prefer=("a", "b"), max_failovers=1)
    with pytest.raises(RouteUnavailable, match="2 node failures"):
        _generate(model)


def test_with_no_replacement_left_the_error_says_which_node_failed_and_why(spans, connect):
    network = FakeNetwork(
        [FakeNode("a", spans["0:2"]), FakeNode("liar", spans["2:4"], behaviour=WrongKey())]
    )
    model = connect(network)
    with pytest.raises(RouteUnavailable, match=r"block\(s\) 2-3.*BadSignature"):
        _generate(model)
    assert _banned(model, network) == {"liar"}


@pytest.fixture(scope="module")
def referee(bloom_dir: Path) -> Referee:
    return Referee(RefereeConfig(bloom_dir))


@pytest.mark.parametrize("step", [0, 1], ids=["during-the-replay", "right-after-the-replay"])
def test_a_failover_right_after_a_convicted_node_is_rewound_keeps_the_honest_tokens(
    spans, connect, honest_tokens, referee, step
):
    """The cheater's check fails, the referee convicts it, the session rewinds onto v1, which
    then dies at its k-th step (its step 0 is the replay that rebuilds its cache); v2 takes
    over. Both honest verifiers may check the cheater: neither is banned for it."""
    network = FakeNetwork(
        [
            FakeNode("a", spans["0:2"]),
            FakeNode("a2", spans["0:2"]),
            FakeNode("cheater", spans["2:4"], behaviour=Noise(0.5)),
            FakeNode("v1", spans["2:4"], die_at=step),
            FakeNode("v2", spans["2:4"]),
        ]
    )
    ledger = FakeLedger(list(network.nodes.values()), referee)
    checks = SpotCheckConfig(rate=1.0, seed=0)
    model = connect(network, prefer=("a", "cheater", "v1"), checks=checks, ledger=ledger)
    rewinds: list[int] = []
    input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    tokens = model.generate(input_ids, CONFIG, on_rewind=rewinds.append)
    log = model.backbone.last_session.log
    assert torch.equal(tokens, honest_tokens)
    assert rewinds
    assert [network.name_of(r.peer_id) for r in log.rewinds] == ["cheater"]
    assert [d.ruling.decision for d in log.disputes] == ["node-lied"]
    assert _banned(model, network) == {"cheater", "v1"}
    assert any(fault.startswith(network.peer("v1")) for fault in log.faults)
    assert [network.name_of(hop.peer_id) for hop in model.backbone.last_session.route] == [
        "a",
        "v2",
    ]


def test_the_session_signs_with_the_signer_it_is_given(spans, head, honest_tokens, tmp_path):
    """A stand-in signer (what benchmarks pass) signs every request; nodes check it."""

    @dataclasses.dataclass(frozen=True)
    class OtherSigner:
        identity: Identity

        @property
        def public_key(self) -> bytes:
            return self.identity.public_key

        def sign(self, message: bytes) -> bytes:
            return self.identity.sign(message)

    network = FakeNetwork([FakeNode("a", spans["0:2"]), FakeNode("b", spans["2:4"])])
    signer = OtherSigner(Identity.generate())
    config = ClientConfig(initial_peers=("in-process",), identity=tmp_path / "unused.key")
    loop = BackgroundLoop()
    backbone = RemoteBackbone(Swarm(network, config), head.manifest, signer, loop)
    with DistributedModelForCausalLM(head, backbone, loop) as model:
        assert torch.equal(_generate(model), honest_tokens)
        keys = {record.request.client_key for record in model.last_work}
    assert keys == {signer.public_key}
    assert not (tmp_path / "unused.key").exists()
