"""Points buy priority end to end: earned points buy a ticket, nodes honour it and are paid.

Under free load the ticketed steps overtake queued free ones (the node counts them and says so
in ``rpc_info``); the latencies of whole clients are compared by
benchmarks/priority_under_load.py, not here (no timing thresholds in tests). The command line
is driven too: ``corolla generate --priority high`` with a ticket that pays, and with one too
small to pay for the generation, which then finishes at free priority with the node's note.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from swarm_fixtures import Swarm
from test_swarm_cli import corolla

from corolla.client.generation import GenerationConfig
from corolla.ledger.api.client import LedgerClient
from corolla.simulations.ledger_process import LedgerProcess
from corolla.simulations.scenes import (
    FreeLoad,
    buy_ticket,
    client_model,
    earn_points,
    earn_until,
    richest,
    step_times,
)
from corolla.verify.identity import load_or_create_identity
from corolla.verify.receipts import work_units

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
            load.running(clients=3),
            client_model(swarm, bloom_dir, rich.identity, allow=busy.peer_id) as paid,
            client_model(swarm, bloom_dir, tmp_path / "probe.key", allow=busy.peer_id) as free,
        ):
            paid.backbone.ticket = bought.ticket
            overtaken_before = paid.backbone.node_info(busy.peer_id).overtaken
            paid_tokens, _ = step_times(paid, PROMPT, CONFIG)
            overtaken = paid.backbone.node_info(busy.peer_id).overtaken - overtaken_before
            free_tokens, _ = step_times(free, PROMPT, CONFIG)
            granted = paid.backbone.last_session.log.granted
            units = sum(work_units(w.request) for w in paid.backbone.last_session.log.work)
        with LedgerClient(ledger.url) as api:
            deadline = time.monotonic() + 30
            while api.ticket(bought.ticket.digest())[1] < units and time.monotonic() < deadline:
                time.sleep(0.5)  # the node redeems every refresh period
            spent = api.ticket(bought.ticket.digest())[1]
            after = api.balance(busy_key)
    assert granted == {busy.peer_id: "high"}
    assert overtaken > 0  # its steps went ahead of free ones already waiting in the queue
    assert torch.equal(paid_tokens, free_tokens)
    assert spent == units  # every ticketed step redeemed, once
    assert after - before >= units


def test_generate_priority_high_pays_with_a_ticket_and_finishes_free_when_it_runs_out(
    bloom_dir: Path, tmp_path: Path
):
    with (
        LedgerProcess(tmp_path / "ledger.db", tmp_path / "ledger.key") as ledger,
        Swarm(tmp_path / "nodes") as swarm,
    ):
        for _ in range(2):  # one serves, the other verifies
            swarm.start(bloom_dir, blocks="0:4", extra_args=["--ledger", ledger.url])
        earner = tmp_path / "earner.key"
        rich, _ = earn_until(swarm, bloom_dir, ledger.url, earner, 240, PROMPT, max_sessions=6)
        with LedgerClient(ledger.url) as api:  # a node whose served work was checked
            node = next(n for n in swarm.nodes if _account(api, n).reputation >= 1)
        peers = swarm.initial_peers[0]

        def generate(*extra: str) -> dict:
            result = corolla(
                "generate", "--model", str(bloom_dir), "--initial-peers", peers,
                "--identity", str(rich.identity), "--max-new-tokens", "8", "--no-eos",
                "--check-rate", "0", "--wallet", str(tmp_path / "wallet.json"), "--json",
                "--allow", node.peer_id, *extra, PROMPT,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        free = generate()
        paying = generate("--priority", "high", "--ledger", ledger.url, "--ticket-budget", "200")
        (tmp_path / "wallet.json").unlink()
        short = generate("--priority", "high", "--ledger", ledger.url, "--ticket-budget", "40")
    assert free["swarm"]["priority"] == {node.peer_id: "free"}
    assert paying["swarm"]["priority"] == {node.peer_id: "high"}
    assert paying["swarm"]["priority_notes"] == []
    # 40 block-tokens cannot pay for the prefill (29 tokens x 4 blocks): the node says so and
    # the whole generation runs free, without an error.
    assert short["swarm"]["priority"] == {node.peer_id: "free"}
    (note,) = short["swarm"]["priority_notes"]
    assert note.startswith(node.peer_id) and "free priority" in note
    assert free["token_ids"] == paying["token_ids"] == short["token_ids"]


def _account(api: LedgerClient, node):
    return api.account(load_or_create_identity(node.identity).public_key)
