"""Memory of a node is its span only: resident size of processes that load part of a model.

    python benchmarks/model_memory.py [--model DIR] [--spans 0:15 0:30] [--quant none]

Each span loads in a fresh process (``load_span``, as a node does); the process reports its
resident set size after importing everything (the baseline), after loading, and its peak. The
client's share (``load_head``: embeddings, final norm, LM head, tokenizer) is measured the same
way. Without --model it uses the trained model (``corolla model fetch smollm2-135m``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from corolla.node.model.checkpoint import parse_span


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(model: str, what: str, quant: str) -> None:
    """Runs in the measured process: load one thing, print one JSON line."""
    import gc

    import torch  # noqa: F401  (imported before the baseline, as in a node)
    from transformers.utils import logging as hf_logging

    from corolla.client.head import load_head
    from corolla.node.model.span import load_span

    hf_logging.set_verbosity_error()
    gc.collect()
    baseline = _rss_bytes()
    if what == "head":
        head = load_head(model)
        weights = sum(t.numel() * t.element_size() for t in head.head.state_dict().values())
    else:
        start, end = parse_span(what)
        span = load_span(model, start, end, quant)
        weights = span.weight_bytes()
    gc.collect()
    print(
        json.dumps(
            {
                "baseline": baseline,
                "loaded": _rss_bytes(),
                "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "weights": weights,
            }
        )
    )


def measure(model: str, what: str, quant: str) -> dict[str, int]:
    command = [sys.executable, __file__, "--child", what, "--model", model, "--quant", quant]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        raise SystemExit(f"measuring {what} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str)
    parser.add_argument("--spans", nargs="+", default=["0:15", "0:30"])
    parser.add_argument("--quant", default="none")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.quant)
        return
    if args.model is None:
        from corolla.node.model.fetch import fetch_model

        args.model = str(fetch_model("smollm2-135m"))
    rows = {what: measure(args.model, what, args.quant) for what in [*args.spans, "head"]}
    mib = 1 << 20
    table = Table(title=f"resident memory of one process, {args.model} (quant {args.quant})")
    for column in (
        "loads",
        "weights MiB",
        "RSS after load MiB",
        "added by loading MiB",
        "peak MiB",
    ):
        table.add_column(column, justify="right")
    for what, row in rows.items():
        table.add_row(
            "client head" if what == "head" else f"span {what}",
            f"{row['weights'] / mib:.0f}",
            f"{row['loaded'] / mib:.0f}",
            f"{(row['loaded'] - row['baseline']) / mib:.0f}",
            f"{row['peak'] / mib:.0f}",
        )
    console = Console()
    console.print(table)
    spans = [what for what in rows if what != "head"]
    if len(spans) >= 2:
        small, large = rows[spans[0]], rows[spans[-1]]
        added = (small["loaded"] - small["baseline"]) / (large["loaded"] - large["baseline"])
        console.print(
            f"span {spans[0]} / span {spans[-1]}: RSS {small['loaded'] / large['loaded']:.2f}x, "
            f"added by loading {added:.2f}x, weights {small['weights'] / large['weights']:.2f}x"
        )


if __name__ == "__main__":
    main()
