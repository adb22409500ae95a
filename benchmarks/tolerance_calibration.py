"""Calibrate the spot-check tolerance per compute profile, and measure what it catches.

    python benchmarks/tolerance_calibration.py [--layers 8] [--hidden 256] [--heads 8]
        [--sessions 8] [--decode-steps 24] [--max-prompt 96] [--cuts 3] [--seed 0]
        [--families bloom llama] [--profiles fp32 int8 nf4] [--model DIR]

For each family and compute profile it plays honest sessions: a node runs a span with its KV
cache (a prefill in 1-3 chunks, then one-token decode steps), and a verifier that loaded the
same blocks on its own recomputes prefixes of the session in ONE forward call, as a spot-check
does. Each session draws its prompt (random token ids), length, chunking, batch (1 or 2), span
(all blocks, the second half, or the last block alone, fed by an upstream span) and the node's
threads (1 or 2); each recomputation draws the verifier's threads (1 or 2) and whether it
batches the prefix with another sequence. Every (recomputation, step) pair is a checked step.
Every profile of a family sees the same sessions, so profiles compare like for like.

It prints the honest score distribution, each source of divergence alone, the threshold rule
(smallest power of ten >= 10x the largest honest score) next to the thresholds in
corolla.verify.tolerance with their false positives, the detection rate of noise added to the
claimed output, and of the adversaries computable here (lazy, wrong model, wrong quantization).
Without --model it creates tiny checkpoints of the given size (the demo's 8 x 256 by default);
--model calibrates a real checkpoint (no wrong-model adversary then).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from corolla.client.head import ClientHead, load_head
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.span import Span, load_span
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.verify.tolerance import TOLERANCES, compare, token_errors

QUANT = {"fp32": None, "int8": "int8", "nf4": "nf4"}
NOISE = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
RELIABLE = 0.99


@dataclass
class Row:
    """Everything measured for one (family, profile)."""

    honest: list[float] = field(default_factory=list)  # score of each checked step
    max_abs: list[float] = field(default_factory=list)  # max |a-b| / rms(b), for comparison
    identical: int = 0  # checked steps whose claimed output equals the recomputation bit for bit
    noise: dict[str, list[bool]] = field(default_factory=dict)  # "dense 1e-3" -> failed?
    adversary: dict[str, list[float]] = field(default_factory=dict)  # name -> scores


def session_schedule(rng: random.Random, prompt: int, decode: int) -> list[tuple[int, int]]:
    """Token ranges of the steps: the prompt in 1-3 chunks, then one token per step."""
    chunks = min(prompt, rng.choice((1, 1, 2, 3)))
    cuts = sorted(rng.sample(range(1, prompt), chunks - 1)) if chunks > 1 else []
    bounds = [0, *cuts, prompt]
    steps = list(itertools.pairwise(bounds))
    return steps + [(t, t + 1) for t in range(prompt, prompt + decode)]


def run_cached(span: Span, inputs: torch.Tensor, steps: list[tuple[int, int]]) -> torch.Tensor:
    """The node: the session's steps through `span` with one KV cache; outputs concatenated."""
    cache = span.new_cache(inputs.shape[0])
    return torch.cat([span.forward(inputs[:, a:b], cache) for a, b in steps], dim=1)


def max_abs_scores(claimed: torch.Tensor, recomputed: torch.Tensor) -> torch.Tensor:
    a, b = claimed.double(), recomputed.double()
    return (a - b).abs().amax(dim=-1) / b.pow(2).mean(dim=-1).sqrt()


def perturb(claimed: torch.Tensor, size: float, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Noise of relative L2 size `size` per token: dense Gaussian, or all on one coordinate."""
    norm = claimed.norm(dim=-1, keepdim=True)  # batch, tokens, 1
    if kind == "dense":
        noise = torch.randn(claimed.shape, generator=gen)
        return claimed + size * norm * noise / noise.norm(dim=-1, keepdim=True)
    index = torch.randint(claimed.shape[-1], claimed.shape[:-1], generator=gen).unsqueeze(-1)
    return claimed.scatter_add(-1, index, size * norm)


def calibrate(
    profile: str,
    spans: dict[str, Span],
    verifier: Span,
    wrong: Span | None,
    head: ClientHead,
    args: argparse.Namespace,
    rng: random.Random,
) -> Row:
    """Honest sessions of `spans[profile]` checked by `verifier`, with every adversary."""
    row = Row()
    node_span = spans[profile]
    n = node_span.end
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for _ in range(args.sessions):
        prompt = rng.randint(2, args.max_prompt)
        batch = rng.choice((1, 2))
        start = rng.choice(sorted({0, n // 2, n - 1}))
        steps = session_schedule(rng, prompt, args.decode_steps)
        total = steps[-1][1]
        ids = torch.randint(0, 256, (batch, total), generator=gen)
        torch.set_num_threads(rng.choice((1, 2)))
        inputs = head.embed(ids)  # batch, total, hidden
        if start:
            inputs = run_cached(node_span.subspan(0, start), inputs, steps)
        claimed = run_cached(node_span.subspan(start, n), inputs, steps)
        torch.set_num_threads(2)
        adversaries = {"lazy: echo input": inputs}
        if n - start > 1:
            adversaries["lazy: skip last block"] = node_span.subspan(start, n - 1).forward(inputs)
        if wrong is not None:
            adversaries["wrong model"] = wrong.subspan(start, n).forward(inputs)
        for other, span in spans.items():
            if other != profile:
                adversaries[f"{other} claiming {profile}"] = span.subspan(start, n).forward(inputs)
        for cut in sorted(rng.sample(range(len(steps)), min(args.cuts, len(steps)))):
            end = steps[cut][1]
            prefix = inputs[:, :end]
            stacked = rng.random() < 0.5
            if stacked:  # the verifier batches this check with another session's prefix
                prefix = torch.cat([prefix, torch.randn(1, end, prefix.shape[2], generator=gen)])
            torch.set_num_threads(rng.choice((1, 2)))
            recomputed = verifier.subspan(start, n).forward(prefix)[:batch]
            for a, b in steps[: cut + 1]:
                mine, theirs = claimed[:, a:b], recomputed[:, a:b]
                score = compare(mine, theirs, profile).score
                row.honest.append(score)
                row.max_abs.append(float(max_abs_scores(mine, theirs).max()))
                row.identical += int(torch.equal(mine, theirs))
                for kind in ("dense", "one coordinate"):
                    for size in NOISE:
                        bad = perturb(mine, size, kind, gen)
                        failed = not compare(bad, theirs, profile).passed
                        row.noise.setdefault(f"{kind} {size:.0e}", []).append(failed)
                for name, output in adversaries.items():
                    row.adversary.setdefault(name, []).append(
                        float(token_errors(output[:, a:b], theirs).max())
                    )
    return row


def adversary_order(item: tuple[str, list[float]]) -> tuple[int, str]:
    name = item[0]
    return (0 if name.startswith("lazy") else 1 if name == "wrong model" else 2, name)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def rule(largest_honest: float) -> float:
    """Threshold rule: the smallest power of ten at least 10x the largest honest score."""
    return 10.0 ** math.ceil(math.log10(10 * max(largest_honest, 1e-12)))


def divergence_sources(model_dir: Path, profile: str, gen: torch.Generator) -> list[str]:
    """Each source of honest divergence alone, on one input: max score (or 'bit-identical')."""
    torch.set_num_threads(1)
    one = load_span(model_dir, 0, Checkpoint(model_dir).num_blocks, QUANT[profile])
    torch.set_num_threads(2)
    two = load_span(model_dir, 0, one.end, QUANT[profile])
    same_weights = all(
        torch.equal(a, b)
        for a, b in zip(
            one.blocks.state_dict().values(), two.blocks.state_dict().values(), strict=True
        )
    )
    x = torch.randn(1, 64, one.hidden_size, generator=gen)
    reference = two.forward(x)
    torch.set_num_threads(1)
    results = {"threads 1 vs 2": two.forward(x)}
    torch.set_num_threads(2)
    results["batch 1 vs 2"] = two.forward(torch.cat([x, torch.randn(x.shape, generator=gen)]))[:1]
    shorter = two.forward(x[:, :48])
    results["cached decode vs one-shot"] = run_cached(
        two, x, [(0, 48)] + [(t, t + 1) for t in range(48, 64)]
    )

    def cell(output: torch.Tensor, ref: torch.Tensor) -> str:
        return (
            "identical"
            if torch.equal(output, ref)
            else f"{float(token_errors(output, ref).max()):.1e}"
        )

    cells = [cell(output, reference) for output in results.values()]
    cells.insert(2, cell(shorter, reference[:, :48]))
    return ["identical" if same_weights else "DIFFERENT", *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--init", type=float, default=0.2, help="initializer range")
    parser.add_argument("--sessions", type=int, default=8, help="per family and profile")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--max-prompt", type=int, default=96)
    parser.add_argument("--cuts", type=int, default=3, help="recomputations per session")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=["bloom", "llama"])
    parser.add_argument("--profiles", nargs="+", default=list(TOLERANCES), choices=TOLERANCES)
    parser.add_argument("--model", type=Path, help="calibrate this checkpoint instead")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    gen = torch.Generator().manual_seed(args.seed)
    rows: dict[tuple[str, str], Row] = {}
    sources: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory() as temp:
        models: dict[str, tuple[Path, Path | None]] = {}
        if args.model:
            models[Checkpoint(args.model).family.name] = (args.model, None)
        else:
            for family in args.families:
                tiny = TinyModelConfig(
                    family=family,
                    num_layers=args.layers,
                    hidden_size=args.hidden,
                    num_heads=args.heads,
                    num_kv_heads=max(1, args.heads // 2),
                    seed=args.seed,
                    initializer_range=args.init,
                )
                models[family] = (
                    create_tiny_model(Path(temp) / family, tiny),
                    create_tiny_model(Path(temp) / f"{family}-other", replace_seed(tiny)),
                )
        for family, (model_dir, other_dir) in models.items():
            head = load_head(model_dir)
            n = head.num_blocks
            spans = {p: load_span(model_dir, 0, n, QUANT[p]) for p in TOLERANCES}
            for profile in args.profiles:
                console.log(f"{family} {profile}: {args.sessions} honest sessions")
                verifier = load_span(model_dir, 0, n, QUANT[profile])
                wrong = load_span(other_dir, 0, n, QUANT[profile]) if other_dir else None
                # The same sessions for every profile of a family: profiles compare like for like.
                rng = random.Random(f"{args.seed}/{family}")
                rows[family, profile] = calibrate(profile, spans, verifier, wrong, head, args, rng)
                sources[family, profile] = divergence_sources(model_dir, profile, gen)
    report(console, args, rows, sources)


def replace_seed(tiny: TinyModelConfig) -> TinyModelConfig:
    return TinyModelConfig(**{**tiny.__dict__, "seed": tiny.seed + 1})


def report(
    console: Console,
    args: argparse.Namespace,
    rows: dict[tuple[str, str], Row],
    sources: dict[tuple[str, str], list[str]],
) -> None:
    size = f"{args.layers} blocks x {args.hidden} hidden" if not args.model else str(args.model)
    table = Table(title=f"Honest divergence: cached node vs one-shot verifier ({size})")
    for column in ("family", "profile", "checked steps", "bit-identical", "median", "p99"):
        table.add_column(column, justify="right")
    for column in ("p99.9", "max", "max-abs/rms max"):
        table.add_column(column, justify="right")
    for (family, profile), row in rows.items():
        h = row.honest
        table.add_row(
            family,
            profile,
            str(len(h)),
            f"{row.identical / len(h):.0%}",
            *(f"{quantile(h, q):.1e}" for q in (0.5, 0.99, 0.999)),
            f"{max(h):.1e}",
            f"{max(row.max_abs):.1e}",
        )
    console.print(table)

    table = Table(title="Sources of honest divergence, each alone (max score over 64 tokens)")
    for column in ("family", "profile", "weights, 2 loads", "threads 1 vs 2", "batch 1 vs 2"):
        table.add_column(column, justify="right")
    table.add_column("prefix 48 of 64", justify="right")
    table.add_column("cached decode", justify="right")
    for (family, profile), cells in sources.items():
        table.add_row(family, profile, *cells)
    console.print(table)

    table = Table(title="Thresholds: smallest power of ten >= 10x the largest honest score")
    for column in ("profile", "checked steps", "largest honest", "rule gives", "in code"):
        table.add_column(column, justify="right")
    for column in ("margin", "false positives", "FP rate", "FP rate, 95% bound"):
        table.add_column(column, justify="right")
    for profile in args.profiles:
        honest = [s for (_, p), row in rows.items() if p == profile for s in row.honest]
        threshold = TOLERANCES[profile].threshold
        false = sum(s > threshold for s in honest)
        table.add_row(
            profile,
            str(len(honest)),
            f"{max(honest):.1e}",
            f"{rule(max(honest)):.0e}",
            f"{threshold:.0e}",
            f"{threshold / max(honest):.0f}x",
            str(false),
            f"{false / len(honest):.2%}",
            f"< {1 - 0.05 ** (1 / len(honest)):.2%}" if not false else "—",
        )
    console.print(table)
    console.print(
        "threshold rule: the smallest power of ten at least 10x the largest honest score of the "
        "profile (margin = threshold / largest honest score); the 95% bound on the false-positive "
        "rate is the one-sided Clopper-Pearson bound for zero failures\n"
    )

    smallest: list[float] = []
    table = Table(title="Detection of noise added to the claimed output (relative L2 size)")
    table.add_column("family / profile")
    table.add_column("kind")
    for size in NOISE:
        table.add_column(f"{size:.0e}", justify="right")
    table.add_column(f"smallest >= {RELIABLE:.0%}", justify="right")
    for (family, profile), row in rows.items():
        for kind in ("dense", "one coordinate"):
            rates = [sum(v) / len(v) for v in (row.noise[f"{kind} {s:.0e}"] for s in NOISE)]
            reliable = [s for s, r in zip(NOISE, rates, strict=True) if r >= RELIABLE]
            table.add_row(
                f"{family} / {profile}",
                kind,
                *(f"{r:.0%}" for r in rates),
                f"{min(reliable):.0e}" if reliable else "none",
            )
            smallest.append(min(reliable) if reliable else math.inf)
    console.print(table)
    console.print(
        f"smallest perturbation caught on >= {RELIABLE:.0%} of checked steps in every row: "
        f"{max(smallest):.0e} of the hidden state's norm\n"
    )

    table = Table(title="Adversaries: share of checked steps caught, and their scores")
    for column in ("family / profile", "adversary", "checked steps", "caught"):
        table.add_column(column, justify="right")
    for column in ("smallest score", "median score", "smallest / threshold"):
        table.add_column(column, justify="right")
    for (family, profile), row in rows.items():
        threshold = TOLERANCES[profile].threshold
        for name, scores in sorted(row.adversary.items(), key=adversary_order):
            caught = sum(s > threshold for s in scores) / len(scores)
            table.add_row(
                f"{family} / {profile}",
                name,
                str(len(scores)),
                f"{caught:.1%}",
                f"{min(scores):.1e}",
                f"{quantile(scores, 0.5):.1e}",
                f"{min(scores) / threshold:.0f}x",
            )
    console.print(table)


if __name__ == "__main__":
    main()
