"""`corolla generate`: text from a prompt, locally or through the swarm."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import ClientHead, load_head
from corolla.client.local import LocalBackbone, even_splits
from corolla.errors import InvalidInput
from corolla.node.checkpoint import parse_span

__all__ = ["register"]

_status = Console(stderr=True)


class TextStream:
    """Prints generated text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, head: ClientHead, enabled: bool) -> None:
        self._head = head
        self._enabled = enabled
        self._ids: list[int] = []
        self._printed = 0

    def __call__(self, tokens: torch.Tensor) -> None:
        self._ids.append(int(tokens[0]))
        if not self._enabled:
            return
        text = self._head.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # a multi-byte character is not complete yet
        sys.stdout.write(text[self._printed :])
        sys.stdout.flush()
        self._printed = len(text)


def generate_command(
    prompt: str = typer.Argument(..., help="The text to continue."),
    model: Path = typer.Option(..., "--model", help="Checkpoint directory (the client side)."),
    local: bool = typer.Option(False, "--local", help="Run every block in this process."),
    spans: int = typer.Option(2, "--spans", help="With --local: split the blocks in N spans."),
    splits: str | None = typer.Option(
        None, "--splits", help="With --local: explicit spans, e.g. 0:3,3:8 (overrides --spans)."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float | None = typer.Option(None, help="Sampling temperature (implies --sample)."),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Keep the k likeliest (implies --sample)."
    ),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus mass (implies --sample)."),
    seed: int | None = typer.Option(None, help="Seed for sampling (same seed, same text)."),
    no_eos: bool = typer.Option(False, "--no-eos", help="Do not stop at the end-of-text token."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Generate text after PROMPT, streamed to the terminal as it is produced."""
    if not prompt:
        raise InvalidInput("the prompt is empty: give some text to continue")
    if not local:
        raise InvalidInput("say --local to run every block here (the swarm client comes next)")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample or temperature is not None or top_k is not None or top_p is not None,
        temperature=1.0 if temperature is None else temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
        stop_at_eos=not no_eos,
    )
    config.validate()
    started = time.perf_counter()
    with _status.status("loading the model", spinner="dots"):
        head = load_head(model)
        chosen = (
            [parse_span(part) for part in splits.split(",")]
            if splits
            else even_splits(head.num_blocks, spans)
        )
        backbone = LocalBackbone.load(model, chosen)
    loaded = time.perf_counter()
    input_ids = head.tokenizer(prompt, return_tensors="pt").input_ids  # 1, prompt
    stream = TextStream(head, enabled=not as_json)
    if not as_json:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    new_ids = generate(head, backbone, input_ids, config, on_tokens=stream)[0]
    finished = time.perf_counter()
    text = head.tokenizer.decode(new_ids.tolist(), skip_special_tokens=True)
    if as_json:
        elapsed = finished - loaded
        result = {
            "prompt": prompt,
            "prompt_token_ids": input_ids[0].tolist(),
            "token_ids": new_ids.tolist(),
            "text": text,
            "model_digest": head.model_digest.hex(),
            "timings": {
                "load_s": round(loaded - started, 4),
                "generate_s": round(elapsed, 4),
                "tokens_per_s": round(len(new_ids) / elapsed, 2) if elapsed > 0 else None,
            },
        }
        typer.echo(json.dumps(result))
    else:
        sys.stdout.write("\n")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
