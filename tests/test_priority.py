"""Points buy priority end to end: earned points buy a ticket, nodes honour it and are paid.

That ticketed steps overtake queued free ones is shown where it is decided, in the node's
queue (tests/test_node_priority.py, tests/test_scheduler.py); on this 2-core machine the
end-to-end latency of whole clients is dominated by the clients' and daemons' own CPU
(benchmarks/priority_under_load.py prints it).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig
from corolla.ledger.client import LedgerClient
from corolla.ledger.process import LedgerProcess
from corolla.scenarios import FreeLoad, buy_ticket, client_model, earn_points, richest, step_times
from corolla.verify.identity import load_or_create_identity

PROMPT = "Priority for those who serve"
CONFIG = GenerationConfig(max_new_tokens=16, stop_at_eos=False)


def test_earned_points_buy_a_ticket_that_a_loaded_node_honours_and_is_paid_from(
    bloom_dir: Path, tmp_path: Path
):
    with (
        LedgerProcess(tmp_path / "ledger.db", tmp_path / "ledger.key") as ledger,
        Swarm(tmp_path / "nodes") as swarm,
    ):
        args = ["--ledger", ledger.url, "--refresh-period", "1"]
        busy = swarm.start(bloom_dir, blocks="0:4", extra_args=args)
        swarm.start(bloom_dir, blocks="0:4", extra_args=args)
        earn_points(swarm, bloom_dir, ledger.url, tmp_path / "earner.key", 2, PROMPT)
        rich, points = richest(ledger.url, swarm.nodes)
        assert points > 100
        bought = buy_ticket(ledger.url, rich.identity, points // 2, tmp_path / "tickets.json")
        assert bought.bought and bought.cost == points // 2
        busy_key = load_or_create_identity(busy.identity).public_key
        with LedgerClient(ledger.url) as api:
            before = api.balance(busy_key)
        load = FreeLoad(swarm, bloom_dir, tmp_path, busy.peer_id, PROMPT, CONFIG)
        with (
            load.running(clients=2),
            client_model(swarm, bloom_dir, rich.identity, allow=busy.peer_id) as paid,
            client_model(swarm, bloom_dir, tmp_path / "probe.key", allow=busy.peer_id) as free,
        ):
            paid.backbone.ticket = bought.ticket
            paid_tokens, _ = step_times(paid, PROMPT, CONFIG)
            free_tokens, _ = step_times(free, PROMPT, CONFIG)
            granted = paid.backbone.last_session.core.granted
            units = sum(
                w.request.tokens * (w.request.end - w.request.start)
                for w in paid.backbone.last_session.work
            )
        with LedgerClient(ledger.url) as api:
            deadline = time.monotonic() + 30
            while api.ticket(bought.ticket.digest())[1] < units and time.monotonic() < deadline:
                time.sleep(0.5)  # the node redeems every refresh period
            spent = api.ticket(bought.ticket.digest())[1]
            after = api.balance(busy_key)
    assert granted == {busy.peer_id: "high"}
    assert torch.equal(paid_tokens, free_tokens)
    assert spent == units  # every ticketed step redeemed, once
    assert after - before >= units
