"""Per-token latency of a ticketed and a free client while N free clients load the same node.

    python benchmarks/priority_under_load.py [--loads 0 2 4] [--tokens 64] [--layers 8]

One run: a ledger and two nodes serving every block; a client earns points with checked work,
the node that earned most buys a ticket with them, then for each load N (free clients
generating in a loop through one node) the ticketed client and one more free client generate
through that node; their median and p90 decode-step latencies are printed, with the ticketed
client's latency as a ratio to its unloaded latency (target: within 1.5x), and how many free
computations its steps overtook in the node's queue and how many times it paused a free one
between two blocks (from the node's `rpc_info`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from corolla.client.generation import GenerationConfig
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.simulations.ledger_process import LedgerProcess
from corolla.simulations.live import LocalSwarm
from corolla.simulations.scenes import FreeLoad, earn_until, latency_ms, paid_vs_free, ticket_budget

PROMPT = "Priority under load"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    console = Console()
    config = GenerationConfig(max_new_tokens=args.tokens, stop_at_eos=False)
    rows = []
    with tempfile.TemporaryDirectory() as temp_dir:
        temp = Path(temp_dir)
        tiny = TinyModelConfig(num_layers=args.layers, hidden_size=args.hidden)
        model_dir = create_tiny_model(temp / "model", tiny)
        blocks = f"0:{args.layers}"
        with (
            LedgerProcess(temp / "ledger.db", temp / "ledger.key") as ledger,
            LocalSwarm(temp / "nodes") as swarm,
        ):
            with console.status("starting a ledger and two nodes; earning points"):
                busy = swarm.start(model_dir, blocks=blocks, extra_args=["--ledger", ledger.url])
                swarm.start(model_dir, blocks=blocks, extra_args=["--ledger", ledger.url])
                # One ticket per run, each with room for the whole generation (prefill too).
                budget = ticket_budget(model_dir, PROMPT, config, args.layers)
                payer, points = earn_until(
                    swarm, model_dir, ledger.url, temp / "earner.key", budget * len(args.loads),
                    PROMPT,
                )  # fmt: skip
            console.print(
                f"{points} points earned by serving; one ticket of {budget} block-tokens per run"
            )
            (temp / "load").mkdir()
            load = FreeLoad(swarm, model_dir, temp / "load", busy.peer_id, PROMPT, config)
            for clients in args.loads:
                with console.status(f"{clients} free clients loading the node"):
                    run = paid_vs_free(load, payer.identity, ledger.url, budget, clients)
                if not run.same_text:
                    raise RuntimeError("the ticketed and the free client generated different text")
                rows.append(
                    (
                        clients,
                        latency_ms(run.paid_times),
                        latency_ms(run.free_times),
                        run.ran_at,
                        f"{run.overtook} / {run.preempted}",
                    )
                )
    table = Table(
        title=f"decode-step latency through one node, tiny BLOOM {args.layers} x "
        f"{args.hidden}, {args.tokens} tokens"
    )
    for column in (
        "free clients loading",
        "ticketed median / p90 ms",
        "free median / p90 ms",
        "ticketed vs its unloaded median",
        "ticketed steps ran at",
        "free steps overtaken / pauses",
    ):
        table.add_column(column)
    unloaded = rows[0][1][0]
    for clients, (paid_median, paid_p90), (free_median, free_p90), granted, passed in rows:
        table.add_row(
            str(clients),
            f"{paid_median:.1f} / {paid_p90:.1f}",
            f"{free_median:.1f} / {free_p90:.1f}",
            f"{paid_median / unloaded:.2f}x",
            str(granted),
            passed,
        )
    console.print(table)
    worst = max(row[1][0] for row in rows) / unloaded
    console.print(f"ticketed latency under load: at most {worst:.2f}x unloaded (target 1.5x)")


if __name__ == "__main__":
    main()
