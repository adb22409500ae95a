"""Points buy priority: a ticketed client overtakes free clients loading the same node."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from pathlib import Path

import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.priority import PriorityConfig, TicketWallet
from corolla.client.reporting import report_session
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.ledger.client import LedgerClient
from corolla.ledger.process import LedgerProcess
from corolla.verify.identity import load_or_create_identity

PROMPT = "Priority for those who serve"
CONFIG = GenerationConfig(max_new_tokens=16, stop_at_eos=False)


def _model(swarm: Swarm, key: Path, allow: str | None = None, checks=None):
    config = ClientConfig(
        initial_peers=tuple(swarm.initial_peers),
        identity=key,
        allow=frozenset([allow]) if allow else frozenset(),
        step_timeout=60.0,
    )
    return DistributedModelForCausalLM.from_pretrained(
        Path(swarm.model_dir), config=config, checks=checks
    )


def _step_times(model: DistributedModelForCausalLM) -> tuple[torch.Tensor, list[float]]:
    input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    stamps = [time.perf_counter()]
    tokens = model.generate(
        input_ids, CONFIG, on_tokens=lambda _: stamps.append(time.perf_counter())
    )
    return tokens, [b - a for a, b in itertools.pairwise(stamps[1:])]  # decode steps only


def test_a_ticketed_client_is_served_ahead_of_free_clients_and_gets_the_same_text(
    bloom_dir: Path, tmp_path: Path
):
    with (
        LedgerProcess(tmp_path / "ledger.db", tmp_path / "ledger.key") as ledger,
        Swarm(tmp_path / "nodes") as swarm,
    ):
        swarm.model_dir = str(bloom_dir)  # type: ignore[attr-defined]
        busy = swarm.start(bloom_dir, blocks="0:4", extra_args=["--ledger", ledger.url])
        verifier = swarm.start(bloom_dir, blocks="0:4", extra_args=["--ledger", ledger.url])
        # Earn: a client uses the swarm with every step checked and reports to the ledger.
        earner = tmp_path / "earner.key"
        with (
            _model(swarm, earner, checks=SpotCheckConfig(rate=1.0, seed=0)) as model,
            LedgerClient(ledger.url, load_or_create_identity(earner)) as api,
        ):
            for _ in range(2):
                _step_times(model)
                session = model.backbone.last_session
                report_session(api, session.work, session.checks)
        # Spend: whoever earned most buys a ticket with its points.
        keys = {node: load_or_create_identity(node.identity) for node in (busy, verifier)}
        with LedgerClient(ledger.url) as api:
            richest = max(keys, key=lambda node: api.balance(keys[node].public_key))
            points = api.balance(keys[richest].public_key)
        assert points > 100
        paid_key = richest.identity
        with LedgerClient(ledger.url, load_or_create_identity(paid_key)) as api:
            wallet = TicketWallet(tmp_path / "tickets.json", api)
            paid = PriorityConfig(ledger_url=ledger.url, budget=points // 2, min_budget_left=1)
            bought = wallet.ticket_for(paid, keys[richest].public_key)
        assert bought.bought and bought.cost == points // 2

        # Load: three free clients hammer the busy node while the paid one generates.
        results: dict[str, tuple[torch.Tensor, list[float]]] = {}
        stop = threading.Event()

        def free_client(name: str) -> None:
            with _model(swarm, tmp_path / f"{name}.key", allow=busy.peer_id) as model:
                results[name] = _step_times(model)
                while not stop.is_set():
                    _step_times(model)

        threads = [threading.Thread(target=free_client, args=(f"free{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        try:
            with _model(swarm, paid_key, allow=busy.peer_id) as model:
                model.backbone.ticket = bought.ticket
                deadline = time.monotonic() + 120
                while len(results) < 3 and time.monotonic() < deadline:
                    time.sleep(0.1)  # the free clients are generating
                paid_tokens, paid_times = _step_times(model)
                granted = model.backbone.last_session.core.granted
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
    free_tokens, free_times = results["free0"]
    assert torch.equal(paid_tokens, free_tokens)
    assert granted == {busy.peer_id: "high"}
    assert statistics.median(paid_times) < statistics.median(free_times)
