"""`corolla model ...` (create and inspect checkpoints) and `corolla node ...` (serve blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import load_manifest
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model

__all__ = ["model_app", "node_app", "register"]

model_app = typer.Typer(help="Create and inspect model checkpoints.", no_args_is_help=True)
node_app = typer.Typer(help="Serve a span of a model's blocks to the swarm.", no_args_is_help=True)


@model_app.command("create-tiny")
def create_tiny(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint."),
    family: str = typer.Option("bloom", help="bloom or llama."),
    layers: int = typer.Option(8, help="Number of transformer blocks."),
    hidden_size: int = typer.Option(256, help="Hidden size."),
    heads: int = typer.Option(8, help="Attention heads."),
    kv_heads: int = typer.Option(4, help="Key/value heads (llama: grouped-query attention)."),
    max_length: int = typer.Option(512, help="Context length in tokens."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a small deterministic checkpoint with an offline byte-level tokenizer."""
    tiny = TinyModelConfig(
        family=family,  # type: ignore[arg-type]
        num_layers=layers,
        hidden_size=hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_length=max_length,
        seed=seed,
    )
    create_tiny_model(directory, tiny)
    manifest = load_manifest(Checkpoint(directory))
    typer.echo(f"created {family} model in {directory} (digest {manifest.model_digest.hex()[:16]})")


@model_app.command("info")
def info(
    directory: Path = typer.Argument(..., help="A checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print the family, blocks, parameter count and digests of a checkpoint."""
    checkpoint = Checkpoint(directory)
    manifest = load_manifest(checkpoint)
    block_params = [
        checkpoint.parameter_count(checkpoint.block_tensor_names(i))
        for i in range(checkpoint.num_blocks)
    ]
    summary = {
        "directory": str(directory),
        "family": checkpoint.family.name,
        "blocks": checkpoint.num_blocks,
        "hidden_size": checkpoint.config.hidden_size,
        "max_length": checkpoint.max_length,
        "parameters": checkpoint.parameter_count(),
        "model_digest": manifest.model_digest.hex(),
        "config_digest": manifest.config_digest.hex(),
        "head_digest": manifest.head_digest.hex(),
        "block_digests": [d.hex() for d in manifest.block_digests],
        "block_parameters": block_params,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{summary['family']}[/bold] model, {summary['blocks']} blocks, hidden size "
        f"{summary['hidden_size']}, context {summary['max_length']}, "
        f"{summary['parameters']:,} parameters"
    )
    console.print(f"model digest  {summary['model_digest']}")
    console.print(f"config digest {summary['config_digest']}")
    console.print(f"head digest   {summary['head_digest']}")
    table = Table("block", "parameters", "block digest", "span 0:block+1 digest")
    for index, digest in enumerate(manifest.block_digests):
        table.add_row(
            str(index),
            f"{block_params[index]:,}",
            digest.hex()[:32],
            manifest.span_digest(0, index + 1).hex()[:32],
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    from corolla.node.run_cli import register_node_run

    register_node_run(node_app)
    app.add_typer(model_app, name="model")
    app.add_typer(node_app, name="node")
