"""Span-chained generation against transformers generate(), and bytes per block by quantization.

    python benchmarks/local_generation.py [--model DIR] [--tokens 64] [--repeats 3]

Measures, in one run on the same checkpoint: greedy tokens/s of `corolla` chained spans
(2 spans) and of `transformers` `generate()`, their ratio, and the weight bytes of one block
in fp32, int8 and nf4. Without --model it creates the default tiny BLOOM (8 x 256) in a
temporary directory.
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
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone, even_splits
from corolla.node.model.span import load_span
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model


def tokens_per_second(run, tokens: int, repeats: int) -> float:
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        produced = run()
        rates.append(produced / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as temp:
        model_dir = args.model or create_tiny_model(Path(temp) / "tiny-bloom", TinyModelConfig())
        head = load_head(model_dir)
        backbone = LocalBackbone.load(model_dir, even_splits(head.num_blocks, 2))
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        input_ids = head.tokenizer("Corolla measures its speed", return_tensors="pt").input_ids
        config = GenerationConfig(max_new_tokens=args.tokens, stop_at_eos=False)

        def ours() -> int:
            return generate(head, backbone, input_ids, config).shape[1]

        def theirs() -> int:
            with torch.inference_mode():
                out = reference.generate(
                    input_ids,
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                )
            return out.shape[1] - input_ids.shape[1]

        same = torch.equal(
            generate(head, backbone, input_ids, config)[0],
            reference.generate(
                input_ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False
            )[0, input_ids.shape[1] :],
        )
        ours_rate = tokens_per_second(ours, args.tokens, args.repeats)
        theirs_rate = tokens_per_second(theirs, args.tokens, args.repeats)
        block_bytes = {
            quant: load_span(model_dir, 0, 1, quant).weight_bytes()
            for quant in ("none", "int8", "nf4")
        }

    console = Console()
    speed = Table(title=f"greedy generation, {args.tokens} tokens, median of {args.repeats}")
    for column in ("path", "tokens/s", "ratio to transformers"):
        speed.add_column(column)
    speed.add_row("transformers generate()", f"{theirs_rate:.1f}", "1.00")
    speed.add_row("corolla, 2 chained spans", f"{ours_rate:.1f}", f"{ours_rate / theirs_rate:.2f}")
    console.print(speed)
    console.print(f"same tokens as transformers: {same}")
    memory = Table(title="weight bytes of one block")
    for column in ("quantization", "bytes", "ratio to fp32"):
        memory.add_column(column)
    for quant, size in block_bytes.items():
        name = "fp32" if quant == "none" else quant
        memory.add_row(name, f"{size:,}", f"{size / block_bytes['none']:.3f}")
    console.print(memory)


if __name__ == "__main__":
    main()
