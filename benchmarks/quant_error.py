"""int8 and nf4 error per token against fp32, on the trained model's real activations.

    python benchmarks/quant_error.py [--model DIR] [--spans 0:2 0:15 0:30]

Feeds the embeddings of a few chat prompts (real token activations, not noise) through spans
loaded in fp32, int8 and nf4, and prints each token's relative L2 error
||quantized - fp32|| / ||fp32|| (median and max over all tokens), plus weight bytes. Also
counts how often greedy decoding of the last position picks another token. Without --model it
uses the trained model (``corolla model fetch smollm2-135m``); README's table for the tiny random
models comes from the quantization tests.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from corolla.client.head import load_head
from corolla.node.model.chat import chat_input_ids, chat_messages, has_chat_template
from corolla.node.model.checkpoint import parse_span
from corolla.node.model.span import load_span

PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse.",
    "List three uses of a paperclip.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str)
    parser.add_argument("--spans", nargs="+", default=["0:2", "0:15", "0:30"])
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if args.model is None:
        from corolla.node.model.fetch import fetch_model

        args.model = str(fetch_model("smollm2-135m"))
    head = load_head(args.model)
    prompts = []
    for text in PROMPTS:
        if has_chat_template(head.tokenizer):
            ids = chat_input_ids(head.tokenizer, chat_messages(text))
        else:
            ids = head.tokenizer(text).input_ids
        prompts.append(torch.tensor([ids]))
    embedded = [head.embed(ids) for ids in prompts]  # each 1, tokens, hidden

    table = Table(title=f"per-token relative L2 error against fp32, {args.model}")
    for column in ("span", "quant", "weight bytes", "median error", "max error", "tokens"):
        table.add_column(column, justify="right")
    for text in args.spans:
        start, end = parse_span(text)
        fp32 = load_span(args.model, start, end)
        references = [fp32.forward(hidden) for hidden in embedded]
        table.add_row(text, "fp32", f"{fp32.weight_bytes():,}", "0", "0", "")
        for quant in ("int8", "nf4"):
            span = load_span(args.model, start, end, quant)
            errors = []
            for hidden, reference in zip(embedded, references, strict=True):
                output = span.forward(hidden)
                per_token = (output - reference).norm(dim=-1) / reference.norm(dim=-1)
                errors.append(per_token.flatten())
            error = torch.cat(errors)
            table.add_row(
                text,
                quant,
                f"{span.weight_bytes():,} ({span.weight_bytes() / fp32.weight_bytes():.0%})",
                f"{error.median().item():.2%}",
                f"{error.max().item():.2%}",
                str(error.numel()),
            )
            del span
        if end == head.num_blocks:
            console = Console()
            for quant in ("int8", "nf4"):
                span = load_span(args.model, start, end, quant)
                same = sum(
                    int(
                        head.logits(span.forward(hidden))[0, -1].argmax()
                        == head.logits(reference)[0, -1].argmax()
                    )
                    for hidden, reference in zip(embedded, references, strict=True)
                )
                console.print(
                    f"whole model, {quant}: next token equals fp32's for {same} of "
                    f"{len(embedded)} prompts"
                )
    Console().print(table)


if __name__ == "__main__":
    main()
