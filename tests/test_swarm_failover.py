"""Failover: dead, hanging or lying nodes are banned and routed around; the text is unchanged.

Real node processes serve a three-hop route (blocks 0:1, 1:3, 3:4) with spares. A killed first,
middle or last hop, a node that accepts a step and never answers, two failures in one session,
and a failure right after a spot-check rewind each yield exactly the no-fault tokens.

The nodes of a family are one pool shared by the module's tests, since starting a node costs
seconds of CPU; a test that kills nodes first asks the pool for what it needs (`ensure`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from swarm_fixtures import NodePool, Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.errors import RouteUnavailable

PROMPT = "Recovery past the first step"
CONFIG = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
FIRST, MIDDLE, LAST = "0:1", "1:3", "3:4"
SPANS = (FIRST, MIDDLE, LAST)
STEP_TIMEOUT = 15.0
HANG_TIMEOUT = 5.0
"""Seconds the client waits for a step in the hanging-node test (an honest step takes ms)."""
CHECKS = SpotCheckConfig(seed=0)
"""The default spot-checks (5 % of steps, every node once), seeded: failover runs with them on."""

POOLS = {
    "bloom": (
        {FIRST: 3, MIDDLE: 4, LAST: 2},
        {"hang": MIDDLE, "noise": MIDDLE, "wrong-key": MIDDLE, "bad-digest": MIDDLE},
    ),
    "llama": ({FIRST: 2, MIDDLE: 2, LAST: 2}, {}),
}
"""Per family: honest nodes per span, and adversaries (strategy: span). Enough spares for the
tests in file order; `NodePool.ensure` starts more when a test runs alone or out of order.
Llama runs the single kills (its rotary positions are what a replay could get wrong); what the
other tests add does not depend on the family, and every node costs CI seconds."""


class Pool(NodePool):
    def __init__(self, swarm: Swarm, model: Path, reference: torch.Tensor) -> None:
        super().__init__(swarm, model)
        self.reference = reference
        """The tokens a local, fault-free run of the model generates after PROMPT."""


@pytest.fixture(scope="module", params=list(POOLS))
def pool(request: pytest.FixtureRequest, model_dirs, tmp_path_factory) -> Iterator[Pool]:
    family = request.param
    model_dir = model_dirs[family]
    head = load_head(model_dir)
    input_ids = head.tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = generate(head, LocalBackbone.load(model_dir, [(0, 4)]), input_ids, CONFIG)
    with Swarm(tmp_path_factory.mktemp(f"pool-{family}")) as swarm:
        pool = Pool(swarm, model_dir, reference)
        try:
            pool.add(*POOLS[family])
            yield pool
        finally:
            pool.kill_all()  # no clean withdrawal needed, and a hanging node ignores SIGTERM


def _client(
    pool: Pool,
    tmp_path: Path,
    *,
    using: str | None = None,
    allow: frozenset[str] = frozenset(),
    step_timeout: float = STEP_TIMEOUT,
    checks: SpotCheckConfig | None = CHECKS,
) -> DistributedModelForCausalLM:
    """A client of the pool: whole spans only, the adversaries blocked except `using`, which the
    client routes through for as long as it can."""
    config = ClientConfig(
        initial_peers=tuple(pool.swarm.initial_peers),
        identity=tmp_path / "client.key",
        step_timeout=step_timeout,
        subspans=False,
        allow=allow,
        block=pool.adversaries() - {using},
        prefer=frozenset({using} if using else ()),
    )
    return DistributedModelForCausalLM.from_pretrained(pool.model, config=config, checks=checks)


def _prompt(model: DistributedModelForCausalLM) -> torch.Tensor:
    return model.tokenizer(PROMPT, return_tensors="pt").input_ids


def _route(model: DistributedModelForCausalLM) -> list[str]:
    session = model.backbone.last_session
    return [hop.peer_id for hop in session.route] if session is not None else []


class Killer:
    """An `on_tokens` callback: SIGKILL the node at route[hop] once `plan` says so."""

    def __init__(
        self, model: DistributedModelForCausalLM, pool: Pool, plan: dict[int, int]
    ) -> None:
        self.model = model
        self.pool = pool
        self.plan = plan  # tokens generated -> index of the hop to kill then
        self.tokens = 0
        self.killed: list[str] = []
        self.routes: list[list[str]] = []  # the route as it was at each kill

    def __call__(self, tokens: torch.Tensor) -> None:
        self.tokens += 1
        hop = self.plan.get(self.tokens)
        if hop is None:
            return
        route = _route(self.model)
        self.routes.append(route)
        self.pool.node(route[hop]).kill()
        self.killed.append(route[hop])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hop", [0, 1, 2], ids=["first-hop", "middle-hop", "last-hop"])
def test_a_hop_of_three_killed_mid_generation_is_replaced_and_the_text_is_unchanged(
    pool: Pool, tmp_path: Path, hop: int
):
    pool.ensure({FIRST: 1, MIDDLE: 1, LAST: 1, SPANS[hop]: 2})
    with _client(pool, tmp_path) as model:
        killer = Killer(model, pool, {4: hop})
        tokens = model.generate(_prompt(model), CONFIG, on_tokens=killer)
        session = model.backbone.last_session
        route = _route(model)
    assert killer.killed, "the test never killed a node"
    assert torch.equal(tokens, pool.reference)
    assert [len(cut) for cut in killer.routes] == [3]
    assert [f.peer_id for f in session.log.failovers] == killer.killed
    failover = session.log.failovers[0]
    assert f"{failover.start}:{failover.end}" == SPANS[hop]
    assert len(route) == 3 and route[hop] == failover.replacements[0] != killer.killed[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", ["bloom"], indirect=True)
def test_two_nodes_killed_at_different_steps_of_one_session_are_both_replaced(
    pool: Pool, tmp_path: Path
):
    pool.ensure({FIRST: 2, MIDDLE: 2, LAST: 1})
    with _client(pool, tmp_path) as model:
        killer = Killer(model, pool, {3: 1, 7: 0})  # the middle hop, later the first
        tokens = model.generate(_prompt(model), CONFIG, on_tokens=killer)
        session = model.backbone.last_session
        route = _route(model)
    assert len(set(killer.killed)) == 2, "the test did not kill two nodes"
    assert torch.equal(tokens, pool.reference)
    assert [f.peer_id for f in session.log.failovers] == killer.killed
    assert [(f.start, f.end) for f in session.log.failovers] == [(1, 3), (0, 1)]
    assert not set(killer.killed) & set(route)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", ["bloom"], indirect=True)
def test_a_node_that_accepts_a_step_and_never_answers_is_timed_out_and_replaced(
    pool: Pool, tmp_path: Path
):
    pool.ensure({FIRST: 1, MIDDLE: 1, LAST: 1})
    hanger = pool.adversary("hang")  # answers a session's first 3 steps, then hangs
    try:
        with _client(pool, tmp_path, using=hanger.peer_id, step_timeout=HANG_TIMEOUT) as model:
            routes: list[list[str]] = []
            tokens = model.generate(
                _prompt(model), CONFIG, on_tokens=lambda _: routes.append(_route(model))
            )
            session = model.backbone.last_session
    finally:
        hanger.kill()
    assert routes[0][1] == hanger.peer_id, "the hanging node was not on the route"
    assert torch.equal(tokens, pool.reference)
    assert [f.peer_id for f in session.log.failovers] == [hanger.peer_id]
    assert re.search(r"did not answer .*within", session.log.failovers[0].reason)
    assert hanger.peer_id not in routes[-1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", ["bloom"], indirect=True)
def test_a_node_that_dies_right_after_a_spot_check_rewind_is_replaced_and_the_text_is_unchanged(
    pool: Pool, tmp_path: Path
):
    # Without a ledger the dispute stays unjudged: both the cheater and its verifier are then
    # avoided, so after the middle hop is killed a third honest middle node must be left.
    pool.ensure({FIRST: 1, MIDDLE: 3, LAST: 1})
    cheater = pool.adversary("noise")
    checks = SpotCheckConfig(rate=0.25, seed=3)
    with _client(pool, tmp_path, using=cheater.peer_id, checks=checks) as model:
        first_route: list[str] = []
        killed: list[str] = []

        def note_route(_: torch.Tensor) -> None:
            first_route[:] = first_route or _route(model)

        def kill_the_middle_hop(kept: int) -> None:
            if not killed:
                victim = _route(model)[1]
                pool.node(victim).kill()
                killed.append(victim)

        tokens = model.generate(
            _prompt(model), CONFIG, on_tokens=note_route, on_rewind=kill_the_middle_hop
        )
        session = model.backbone.last_session
        route = _route(model)
    assert first_route[1] == cheater.peer_id, "the cheater was not on the route"
    assert [outcome.peer_id for outcome in session.log.rewinds] == [cheater.peer_id]
    assert killed and killed[0] != cheater.peer_id
    assert torch.equal(tokens, pool.reference)
    assert [f.peer_id for f in session.log.failovers] == killed
    assert not {cheater.peer_id, killed[0]} & set(route)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", ["bloom"], indirect=True)
@pytest.mark.parametrize("adversary", ["wrong-key", "bad-digest"])
def test_a_node_whose_receipt_does_not_check_out_is_rejected_and_routed_around(
    pool: Pool, tmp_path: Path, adversary: str
):
    pool.ensure({FIRST: 1, MIDDLE: 1, LAST: 1})
    liar = pool.adversary(adversary)
    with _client(pool, tmp_path, using=liar.peer_id) as model:  # the liar is the first choice
        tokens = model.generate(_prompt(model), CONFIG)
        session = model.backbone.last_session
        route = _route(model)
        banned = model.backbone.swarm.bans.is_banned(liar.peer_id)
    assert torch.equal(tokens, pool.reference)
    assert [f.peer_id for f in session.log.failovers] == [liar.peer_id]
    reason = session.log.failovers[0].reason
    assert ("BadSignature" if adversary == "wrong-key" else "BadReceipt") in reason
    assert banned
    assert {work.peer_id for work in session.log.work} == set(route)
    assert liar.peer_id not in route


@pytest.mark.timeout(300)  # the client's own timeouts end it; a hang would fail here
@pytest.mark.parametrize("pool", ["bloom"], indirect=True)
def test_with_no_replacement_the_client_gets_a_clear_error_not_a_hang(pool: Pool, tmp_path: Path):
    pool.ensure({FIRST: 1, MIDDLE: 1, LAST: 1})
    allowed = [pool.live(blocks)[0] for blocks in SPANS]  # one node per span, no spare
    with _client(pool, tmp_path, allow=frozenset(node.peer_id for node in allowed)) as model:
        killer = Killer(model, pool, {3: 1})
        with pytest.raises(RouteUnavailable, match=r"block\(s\) 1-2"):
            model.generate(_prompt(model), CONFIG, on_tokens=killer)
    assert killer.killed == [allowed[1].peer_id]
    assert killer.tokens == 3  # it failed at the step after the kill, not before
