"""What spot-checks cost: tokens/s with checking off and at 1 %, 5 % and 20 % of steps.

    python benchmarks/spot_check_overhead.py [--tokens 64] [--repeats 3] [--layers 8] [--hidden 256]

Runs, in one process against one loopback swarm (two nodes per half of the blocks, so every
node has a verifier), greedy generation with spot-checks off and at several rates, and prints
tokens/s as a ratio to no checking, plus the extra compute the verifiers spent: block-tokens
recomputed per block-token generated. Checks run in the background; the time to settle them at
the end of a session (every node is checked at least once) is included.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from corolla.client.generation import GenerationConfig
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.simulations.live import LocalSwarm
from corolla.verify.receipts import work_units

RATES = (0.0, 0.01, 0.05, 0.20)


def run(model: DistributedModelForCausalLM, tokens: int) -> tuple[float, int, int]:
    """(seconds, block-tokens generated, block-tokens recomputed by verifiers) of one session."""
    input_ids = model.tokenizer("Checking costs", return_tensors="pt").input_ids
    config = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
    started = time.perf_counter()
    model.generate(input_ids, config)
    elapsed = time.perf_counter() - started
    log = model.backbone.last_session.log
    generated = sum(work_units(w.request) for w in log.work)
    recomputed = sum(work_units(r.request) for check in log.checks for r in check.records)
    return elapsed, generated, recomputed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    console = Console()
    results: dict[float, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as temp:
        tiny = TinyModelConfig(num_layers=args.layers, hidden_size=args.hidden)
        model_dir = create_tiny_model(Path(temp) / "model", tiny)
        half = args.layers // 2
        with LocalSwarm(Path(temp) / "nodes") as swarm:
            with console.status("starting 4 nodes"):
                for blocks in (f"0:{half}", f"{half}:{args.layers}") * 2:
                    swarm.start(model_dir, blocks=blocks)
            client = ClientConfig(
                initial_peers=tuple(swarm.initial_peers), identity=Path(temp) / "client.key"
            )
            for rate in RATES:
                checks = SpotCheckConfig(rate=rate, seed=0) if rate > 0 else None
                with (
                    console.status(f"check rate {rate:.0%}"),
                    DistributedModelForCausalLM.from_pretrained(
                        model_dir, config=client, checks=checks
                    ) as model,
                ):
                    run(model, 4)  # warm-up
                    rates, overheads, checks_done = [], [], 0
                    for _ in range(args.repeats):
                        elapsed, generated, recomputed = run(model, args.tokens)
                        rates.append(args.tokens / elapsed)
                        overheads.append(recomputed / generated)
                        checks_done += len(model.backbone.last_session.log.checks)
                    results[rate] = (
                        statistics.median(rates),
                        statistics.median(overheads),
                        checks_done,
                    )
    base = results[0.0][0]
    table = Table(
        title=f"{args.tokens} tokens, tiny BLOOM {args.layers} x {args.hidden}, "
        f"2 hops, median of {args.repeats} sessions"
    )
    for column in ("check rate", "tokens/s", "vs no checks", "checks", "verifier compute"):
        table.add_column(column)
    for rate, (tokens_per_s, overhead, checks_done) in results.items():
        table.add_row(
            "off" if rate == 0 else f"{rate:.0%}",
            f"{tokens_per_s:.1f}",
            f"{tokens_per_s / base:.2f}x",
            str(checks_done),
            f"{overhead:.2f} block-tokens per generated one",
        )
    console.print(table)
    slowdown = 1 - results[0.05][0] / base
    console.print(f"at 5 %: {100 * slowdown:.1f} % fewer tokens/s (target: under 10 %)")


if __name__ == "__main__":
    main()
