"""Scenes that the demo, the benchmarks and the tests stage on a local swarm.

Earning points with checked work, spending them on a ticket, timing a generation step by step,
and loading a node with free clients: shared so that each is written once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from corolla.client.generation import GenerationConfig
from corolla.client.head import load_head
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.priority import PriorityConfig, TicketWallet, WalletTicket
from corolla.client.reporting import report_session
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.errors import LedgerError, NodeUnavailable
from corolla.ledger.api.client import LedgerClient
from corolla.node.protocol.messages import PRIORITY_FREE
from corolla.simulations.live import LocalSwarm, NodeProcess
from corolla.verify.identity import load_or_create_identity

__all__ = [
    "FreeLoad",
    "PaidVsFree",
    "buy_ticket",
    "client_model",
    "earn_points",
    "earn_until",
    "latency_ms",
    "paid_vs_free",
    "richest",
    "step_times",
    "ticket_budget",
]


def client_model(
    swarm: LocalSwarm,
    model_dir: Path,
    key: Path,
    *,
    allow: str | None = None,
    checks: SpotCheckConfig | None = None,
    ledger: str | None = None,
) -> DistributedModelForCausalLM:
    """A client of ``swarm``; with ``ledger``, its checks are assigned by the ledger's beacon
    (and can credit work), else drawn by the client (they protect the text only)."""
    config = ClientConfig(
        initial_peers=tuple(swarm.initial_peers),
        identity=key,
        allow=frozenset([allow]) if allow else frozenset(),
        step_timeout=60.0,
    )
    return DistributedModelForCausalLM.from_pretrained(
        model_dir, config=config, checks=checks, ledger=ledger
    )


def step_times(
    model: DistributedModelForCausalLM, prompt: str, config: GenerationConfig
) -> tuple[torch.Tensor, list[float]]:
    """The tokens and the seconds of each decode step (the prefill is left out)."""
    input_ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    stamps: list[float] = []
    tokens = model.generate(
        input_ids, config, on_tokens=lambda _: stamps.append(time.perf_counter())
    )
    return tokens, [b - a for a, b in itertools.pairwise(stamps)]


def latency_ms(step_seconds: list[float]) -> tuple[float, float]:
    """The median and the 90th percentile of per-step times, in milliseconds."""
    ordered = sorted(step_seconds)
    return 1000 * statistics.median(ordered), 1000 * ordered[int(0.9 * (len(ordered) - 1))]


def earn_points(
    swarm: LocalSwarm, model_dir: Path, ledger_url: str, key: Path, sessions: int, prompt: str
) -> None:
    """A client uses the swarm with every step checked and reports each session: nodes earn."""
    config = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    with (
        client_model(
            swarm, model_dir, key, checks=SpotCheckConfig(rate=1.0, seed=0), ledger=ledger_url
        ) as model,
        LedgerClient(ledger_url, load_or_create_identity(key)) as api,
    ):
        for _ in range(sessions):
            step_times(model, prompt, config)
            session = model.backbone.last_session
            if session is not None:
                report_session(api, session.log.work, session.log.checks)


def earn_until(
    swarm: LocalSwarm,
    model_dir: Path,
    ledger_url: str,
    key: Path,
    points: int,
    prompt: str,
    max_sessions: int = 20,
) -> tuple[NodeProcess, int]:
    """Earn (checked sessions, two at a time) until a node holds `points`; that node and its
    balance. Raises LedgerError if `max_sessions` were not enough."""
    for _ in range(0, max_sessions + 1, 2):
        payer, balance = richest(ledger_url, swarm.nodes)
        if balance >= points:
            return payer, balance
        earn_points(swarm, model_dir, ledger_url, key, 2, prompt)
    raise LedgerError(f"{max_sessions} checked sessions did not earn any node {points} points")


def ticket_budget(model_dir: Path, prompt: str, config: GenerationConfig, blocks: int) -> int:
    """Block-tokens that pay for one generation of `prompt` through `blocks` blocks, twice over."""
    prompt_tokens = len(load_head(model_dir).tokenizer(prompt).input_ids)
    return 2 * (prompt_tokens + config.max_new_tokens) * blocks


def richest(ledger_url: str, nodes: list[NodeProcess]) -> tuple[NodeProcess, int]:
    """The node with the most points, and its balance."""
    with LedgerClient(ledger_url) as api:
        balances = {
            node.name: api.balance(load_or_create_identity(node.identity).public_key)
            for node in nodes
        }
    best = max(nodes, key=lambda node: balances[node.name])
    return best, balances[best.name]


def buy_ticket(ledger_url: str, key: Path, budget: int, wallet: Path) -> WalletTicket:
    identity = load_or_create_identity(key)
    with LedgerClient(ledger_url, identity) as api:
        config = PriorityConfig(
            ledger_url=ledger_url, budget=budget, min_budget_left=1, wallet=wallet
        )
        return TicketWallet(wallet, api).ticket_for(config, identity.public_key)


@dataclass
class FreeLoad:
    """Free clients generating in a loop through one node, each in its own process (as real
    clients on other machines would be), until stopped."""

    swarm: LocalSwarm
    model_dir: Path
    keys: Path
    node: str
    prompt: str
    config: GenerationConfig

    @contextlib.contextmanager
    def running(self, clients: int, ready_timeout: float = 120.0) -> Iterator[None]:
        """Start `clients` processes; yield once each has generated at least once."""
        processes = []
        try:
            for index in range(clients):
                command = [
                    sys.executable, "-c", "from corolla.simulations.scenes import _free_client; "
                    "_free_client()", str(self.model_dir), self.swarm.initial_peers[0], self.node,
                    str(self.keys / f"free{index}.key"), self.prompt,
                    str(self.config.max_new_tokens),
                ]  # fmt: skip
                processes.append(
                    subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        stdin=subprocess.DEVNULL,
                        text=True,
                        start_new_session=True,
                        env={**os.environ, "OMP_NUM_THREADS": "1"},
                        # Real clients run on their own machines: here they must not take the
                        # node's CPU, only its queue.
                        preexec_fn=_lowest_cpu_priority,
                    )
                )
            deadline = time.monotonic() + ready_timeout
            for process in processes:
                line = ""
                while process.stdout is not None and time.monotonic() < deadline:
                    line = process.stdout.readline()
                    if line.startswith("ready") or not line:
                        break
                if not line.startswith("ready"):
                    raise NodeUnavailable("a free load client did not start generating")
            yield
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)


@dataclass(frozen=True)
class PaidVsFree:
    """A ticketed and a free client, one after the other, through the same loaded node."""

    free_clients: int
    """Free clients loading the node meanwhile."""
    paid_times: list[float]
    free_times: list[float]
    ran_at: str
    """The priority the paid steps ran at: "high", or "free" with the node's note."""
    same_text: bool
    ticket: WalletTicket
    overtook: int
    """Free computations the node let the paid client's steps overtake (queued or paused)."""
    preempted: int
    """Times the node paused a free computation between two blocks (for the paid client's steps:
    nobody else had a ticket)."""


def paid_vs_free(
    load: FreeLoad, payer_key: Path, ledger_url: str, budget: int, clients: int
) -> PaidVsFree:
    """Buy a ticket of `budget` block-tokens as `payer_key`, then time a ticketed and a free
    generation through `load.node` while `clients` free clients load it."""
    bought = buy_ticket(ledger_url, payer_key, budget, load.keys / f"tickets-{clients}.json")
    swarm, model_dir, node = load.swarm, load.model_dir, load.node
    with (
        load.running(clients),
        client_model(swarm, model_dir, payer_key, allow=node) as paid,
        client_model(swarm, model_dir, load.keys / "probe.key", allow=node) as free,
    ):
        paid.backbone.ticket = bought.ticket
        before = paid.backbone.node_info(node)
        paid_tokens, paid_times = step_times(paid, load.prompt, load.config)
        after = paid.backbone.node_info(node)
        free_tokens, free_times = step_times(free, load.prompt, load.config)
        session = paid.backbone.last_session
        ran_at = session.log.granted.get(node, PRIORITY_FREE) if session else PRIORITY_FREE
        if session is not None and session.log.priority_notes:
            ran_at += f" ({'; '.join(session.log.priority_notes)})"
    same = torch.equal(paid_tokens, free_tokens)
    overtook, preempted = after.overtaken - before.overtaken, after.preempted - before.preempted
    return PaidVsFree(clients, paid_times, free_times, ran_at, same, bought, overtook, preempted)


def _lowest_cpu_priority() -> None:
    os.nice(19)


def _free_client() -> None:
    """Entry of a load process: generate through one node forever (killed by its parent)."""
    model_dir, peer, node, key, prompt, tokens = sys.argv[1:7]
    config = ClientConfig(
        initial_peers=(peer,), identity=Path(key), allow=frozenset([node]), step_timeout=120.0
    )
    generation = GenerationConfig(max_new_tokens=int(tokens), stop_at_eos=False)
    with DistributedModelForCausalLM.from_pretrained(
        Path(model_dir), config=config, checks=None
    ) as model:
        first = True
        while True:
            step_times(model, prompt, generation)
            if first:
                print("ready", flush=True)
                first = False
