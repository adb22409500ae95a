"""`corolla demo`: a whole swarm on this machine, on the bundled tiny model.

Creates the tiny model if it is missing, starts nodes in subprocesses on 127.0.0.1 (the second
half of the blocks served twice), generates a sample through them while showing the route and
the count of verified receipts, kills one node half-way to show recovery, and shuts everything
down, also on Ctrl-C.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from corolla.client.generation import GenerationConfig, generate
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.errors import InvalidInput
from corolla.node.checkpoint import Checkpoint
from corolla.node.launcher import LocalSwarm
from corolla.node.manifest import load_manifest
from corolla.node.span import Span, load_span
from corolla.node.tiny import TinyModelConfig, create_tiny_model

__all__ = ["register", "run_demo"]

DEFAULT_DIR = Path(".corolla") / "demo"
_console = Console()


def _ensure_model(models: Path, family: str) -> Path:
    model_dir = models / f"tiny-{family}"
    if not (model_dir / "config.json").is_file():
        with _console.status(f"creating the tiny {family} model in {model_dir}"):
            create_tiny_model(model_dir, TinyModelConfig(family=family))  # type: ignore[arg-type]
    load_manifest(Checkpoint(model_dir))
    return model_dir


def run_demo(
    directory: Path,
    family: str,
    prompt: str,
    max_new_tokens: int,
    kill_one: bool,
) -> None:
    if family not in ("bloom", "llama"):
        raise InvalidInput(f"unknown family {family!r} (choose bloom or llama)")
    model_dir = _ensure_model(directory / "models", family)
    num_blocks = Checkpoint(model_dir).num_blocks
    half = num_blocks // 2
    spans = [f"0:{half}", f"{half}:{num_blocks}", f"{half}:{num_blocks}"]
    with (
        tempfile.TemporaryDirectory(prefix="corolla-demo-") as scratch,
        LocalSwarm(Path(scratch) / "nodes") as swarm,
    ):
        with _console.status("starting nodes") as status:
            for blocks in spans:
                status.update(f"starting a node for blocks {blocks}")
                node = swarm.start(model_dir, blocks=blocks)
                _console.print(f"node {node.peer_id[-8:]} serves blocks {blocks}")
        config = ClientConfig(
            initial_peers=tuple(swarm.initial_peers), identity=directory / "client.key"
        )
        local_spans = [load_span(model_dir, 0, num_blocks)]
        with DistributedModelForCausalLM.from_pretrained(model_dir, config=config) as model:
            _generate(model, local_spans, swarm, prompt, max_new_tokens, kill_one)
        _console.print("stopping the nodes")


def _generate(
    model: DistributedModelForCausalLM,
    local_spans: list[Span],
    swarm: LocalSwarm,
    prompt: str,
    max_new_tokens: int,
    kill_one: bool,
) -> None:
    by_peer = {node.peer_id: node for node in swarm.nodes}
    input_ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    produced: list[int] = []
    killed: list[str] = []

    def on_tokens(tokens: torch.Tensor) -> None:
        produced.append(int(tokens[0]))
        session = model.backbone.last_session
        if kill_one and not killed and len(produced) == max_new_tokens // 2 and session:
            victim = session.route[-1].peer_id
            by_peer[victim].kill()
            killed.append(victim)

    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
    started = time.perf_counter()
    with _console.status("generating through the swarm"):
        model.generate(input_ids, config, on_tokens=on_tokens)
    elapsed = time.perf_counter() - started
    session = model.backbone.last_session
    if session is None:
        return
    text = model.tokenizer.decode(produced, skip_special_tokens=True)
    shown = "".join(c if c.isprintable() else "·" for c in text)
    _console.print(f"\n[bold]prompt[/bold]    {prompt}\n[bold]generated[/bold] {shown}")
    _console.print("[dim](random weights: the text is noise; the point is that it is exact)[/dim]")
    reference = generate(model.head, LocalBackbone(local_spans), input_ids, config)[0].tolist()
    verdict = "[green]yes[/green]" if reference == produced else "[red]NO[/red]"
    _console.print(f"equals local generation of the same checkpoint: {verdict}\n")
    route = " -> ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end}]" for h in session.route)
    _console.print(f"route: {route}")
    for failover in session.failovers:
        _console.print(
            f"[yellow]node {failover.peer_id[-8:]} (blocks {failover.start}:{failover.end}) "
            f"was killed mid-generation; replaced by "
            f"{', '.join(p[-8:] for p in failover.replacements)} and its cache rebuilt[/yellow]"
        )
    steps = Counter(record.peer_id for record in session.work)
    table = Table(
        title=f"{len(session.work)} verified receipts, {len(produced)} tokens in {elapsed:.2f} s"
    )
    for column in ("node", "blocks", "verified steps", "state"):
        table.add_column(column)
    for node in swarm.nodes:
        blocks = node.args[node.args.index("--blocks") + 1]
        state = "killed" if node.peer_id in killed else "online"
        table.add_row(node.peer_id[-8:], blocks, str(steps.get(node.peer_id, 0)), state)
    _console.print(table)


def demo(
    directory: Path = typer.Option(DEFAULT_DIR, "--dir", help="Where models and keys are kept."),
    family: str = typer.Option("bloom", help="bloom or llama."),
    prompt: str = typer.Option("A swarm of volunteers", help="The text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate."),
    kill_one: bool = typer.Option(
        True, "--kill-one/--no-kill-one", help="Kill a node half-way to show failover."
    ),
) -> None:
    """Run a whole local swarm on the bundled tiny model and generate through it."""
    if max_new_tokens < 2:
        raise InvalidInput("max-new-tokens must be at least 2")
    run_demo(directory, family, prompt, max_new_tokens, kill_one)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
