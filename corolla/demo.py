"""`corolla demo`: the whole system on this machine, on a real trained model.

By default the demo runs SmolLM2-135M-Instruct (fetched and converted on first use, with progress;
``corolla model fetch smollm2-135m``), so a newcomer reads real answers coming out of a verified
swarm; ``--tiny``, or a machine where the model cannot be had, uses the bundled tiny random model. A
ledger (with a referee that holds the model), four honest nodes and one cheating node on 127.0.0.1;
a client generates through them with spot-checks on, a node dies half-way, the cheater is caught by
a spot-check, routed around and its text regenerated; the client reports the work to the ledger,
which slashes the cheater and pays the honest nodes; a node that earned spends points on a ticket,
and a paid and a free client generate side by side through a node loaded by free clients; then the
ledger is audited. Everything is stopped at the end, also on Ctrl-C.
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
from corolla.client.remote import RemoteSession
from corolla.client.reporting import ReportSummary, report_session
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig
from corolla.errors import CheckpointError, InvalidInput
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.audit import audit
from corolla.ledger.sources import HttpSource
from corolla.node.model.chat import chat_input_ids, chat_messages, has_chat_template
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.fetch import fetch_model
from corolla.node.model.manifest import load_manifest
from corolla.node.model.span import load_span
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.simulations.ledger_process import LedgerProcess
from corolla.simulations.live import LocalSwarm, NodeProcess
from corolla.simulations.scenes import FreeLoad, earn_until, latency_ms, paid_vs_free, ticket_budget
from corolla.verify.identity import load_or_create_identity

__all__ = ["register", "run_demo"]

DEFAULT_DIR = Path(".corolla") / "demo"
REAL_MODEL = "smollm2-135m"
REAL_PROMPT = "What is the capital of France? Answer in one sentence."
TINY_PROMPT = "A swarm of volunteers"
_console = Console()


def _real_model() -> Path | None:
    """The trained model's checkpoint, fetched on first use; None (said why) if it cannot be had."""
    try:
        with _console.status(f"fetching {REAL_MODEL} (first use only: download and convert)"):
            return fetch_model(REAL_MODEL)
    except CheckpointError as error:
        _console.print(f"[yellow]{REAL_MODEL} cannot be had here ({error}); using the tiny model")
        return None


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
    prompt: str | None,
    max_new_tokens: int,
    kill_one: bool,
    cheat: bool,
    priority: bool = True,
    tiny: bool = False,
) -> None:
    if family not in ("bloom", "llama"):
        raise InvalidInput(f"unknown family {family!r} (choose bloom or llama)")
    # The demo's own tensors are small (a head, a reference run); a second OpenMP thread would
    # spin between ops on the cores the nodes it starts need.
    torch.set_num_threads(1)
    real = None if tiny else _real_model()
    model_dir = real or _ensure_model(directory / "models", family)
    if prompt is None:
        prompt = TINY_PROMPT if real is None else REAL_PROMPT
    num_blocks = Checkpoint(model_dir).num_blocks
    half = num_blocks // 2
    first, second = f"0:{half}", f"{half}:{num_blocks}"
    with tempfile.TemporaryDirectory(prefix="corolla-demo-") as scratch_dir:
        scratch = Path(scratch_dir)
        with _console.status("starting the ledger (its referee holds the model)"):
            ledger = LedgerProcess(
                scratch / "ledger.db",
                scratch / "ledger.key",
                # A one-second beacon: checks wait for the epoch after the work they check.
                extra=["--referee-model", str(model_dir), "--beacon-period-s", "1"],
            )
        with ledger, LocalSwarm(scratch / "nodes") as swarm:
            _console.print(f"ledger at {ledger.url}")
            roles: dict[str, str] = {}
            with _console.status("starting nodes") as status:
                plan = [(first, None), (second, None), (first, None), (second, None)]
                if cheat:
                    plan.append((second, "noise"))
                for blocks, adversary in plan:
                    status.update(f"starting a node for blocks {blocks}")
                    node = swarm.start(
                        model_dir,
                        blocks=blocks,
                        adversary=adversary,
                        extra_args=["--ledger", ledger.url],
                    )
                    roles[node.peer_id] = "cheater (noise)" if adversary else "honest"
                    _console.print(
                        f"node {node.peer_id[-8:]} serves blocks {blocks}, {roles[node.peer_id]}"
                    )
            client = ClientConfig(  # the route takes the cheater first
                initial_peers=tuple(swarm.initial_peers),
                identity=scratch / "client.key",
                prefer=frozenset(peer for peer, role in roles.items() if role != "honest"),
            )
            checks = SpotCheckConfig(rate=0.25, seed=0)
            with DistributedModelForCausalLM.from_pretrained(
                model_dir, config=client, checks=checks, ledger=ledger.url
            ) as model:
                session = _generate(
                    model, swarm, roles, prompt, max_new_tokens, kill_one, num_blocks, model_dir
                )
                with LedgerClient(ledger.url, load_or_create_identity(client.identity)) as api:
                    with _console.status("reporting the work and the evidence to the ledger"):
                        report = report_session(api, session.log.work, session.log.checks)
                    _show_report(report, session)
                    balances = _show_nodes(api, swarm, roles, session)
            if priority:
                _paid_and_free(swarm, model_dir, ledger.url, scratch, num_blocks, balances)
            with _console.status("auditing the ledger"):
                result = audit(HttpSource(ledger.url))
            _console.print(
                f"[green]audit passed[/green]: {result.tree_size} entries, "
                f"{result.pairs_verified} receipts and {result.attestations_verified} "
                f"spot-checks re-verified, {result.disputes_checked} disputes re-judged, "
                f"root {result.root_hash.hex()[:16]}"
            )
            _console.print("stopping the nodes and the ledger")


def _generate(
    model: DistributedModelForCausalLM,
    swarm: LocalSwarm,
    roles: dict[str, str],
    prompt: str,
    max_new_tokens: int,
    kill_one: bool,
    num_blocks: int,
    model_dir: Path,
) -> RemoteSession:
    by_peer = {node.peer_id: node for node in swarm.nodes}
    input_ids = _prompt_ids(model.tokenizer, prompt)
    produced: list[int] = []
    killed: list[str] = []
    kill_at = min(max_new_tokens // 2, 4)  # early: a chat answer may be short

    def on_tokens(tokens: torch.Tensor) -> None:
        produced.append(int(tokens[0]))
        session = model.backbone.last_session
        if kill_one and not killed and len(produced) == kill_at and session:
            victim = session.route[0].peer_id
            by_peer[victim].kill()
            killed.append(victim)
            roles[victim] = "honest, killed"

    def on_rewind(kept: int) -> None:
        del produced[kept:]
        _console.print(
            f"[yellow]a spot-check caught a node returning wrong activations: it is banned, and "
            f"generation resumes from token {kept} on a route without it[/yellow]"
        )

    # A chat model answers and stops at its end of turn; the tiny model's noise runs to the end.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, stop_at_eos=has_chat_template(model.tokenizer)
    )
    started = time.perf_counter()
    with _console.status("generating through the swarm"):
        model.generate(input_ids, config, on_tokens=on_tokens, on_rewind=on_rewind)
    elapsed = time.perf_counter() - started
    session = model.backbone.last_session
    if session is None:
        raise InvalidInput("no session ran")
    text = model.tokenizer.decode(produced, skip_special_tokens=True)
    shown = "".join(c if c.isprintable() else "·" for c in text)
    _console.print(f"\n[bold]prompt[/bold]    {prompt}\n[bold]generated[/bold] {shown}")
    if not has_chat_template(model.tokenizer):
        _console.print("[dim](random weights: the text is noise; the point is that it is exact)")
    local = LocalBackbone([load_span(model_dir, 0, num_blocks)])
    reference = generate(model.head, local, input_ids, config)[0].tolist()
    verdict = "[green]yes[/green]" if reference == produced else "[red]NO[/red]"
    _console.print(f"equals local generation of the same checkpoint: {verdict}")
    route = " -> ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end}]" for h in session.route)
    _console.print(f"route at the end: {route}; {len(produced)} tokens in {elapsed:.2f} s")
    for failover in session.log.failovers:
        _console.print(
            f"node {failover.peer_id[-8:]} (blocks {failover.start}:{failover.end}) failed "
            f"({failover.reason[:60]}); replaced by "
            f"{', '.join(p[-8:] for p in failover.replacements)}, cache rebuilt by replay"
        )
    verdicts = Counter(check.verdict for check in session.log.checks)
    _console.print("spot-checks: " + ", ".join(f"{n} {verdict}" for verdict, n in verdicts.items()))
    return session


def _prompt_ids(tokenizer: object, prompt: str) -> torch.Tensor:
    """[1, tokens]: through the chat template where the checkpoint has one."""
    if has_chat_template(tokenizer):  # type: ignore[arg-type]
        return torch.tensor([chat_input_ids(tokenizer, chat_messages(prompt))])  # type: ignore[arg-type]
    return tokenizer(prompt, return_tensors="pt").input_ids  # type: ignore[operator]


def _show_report(report: ReportSummary, session: RemoteSession) -> None:
    for case in session.log.disputes:
        ruling = case.ruling
        _console.print(
            f"[bold]dispute over node {case.peer_id[-8:]}'s work: {ruling.decision}[/bold] "
            f"(judged by the {ruling.judge}: {ruling.reason[:120]})"
        )
    _console.print(
        f"reported {report.pairs} signed receipts and {report.attestations} verifier-signed "
        "verdicts to the ledger"
    )
    for dropped in report.dropped:
        _console.print(f"a verdict the ledger would not count: {dropped}")


def _paid_and_free(
    swarm: LocalSwarm,
    model_dir: Path,
    ledger_url: str,
    scratch: Path,
    blocks: int,
    balances: dict[str, int],
) -> None:
    """A node that earned buys a ticket; it and a free client generate side by side through a
    new node loaded by free clients (each its own low-priority process). ``balances``: what
    the nodes table showed, so the spend line can say where the rest came from."""
    prompt = TINY_PROMPT  # a short plain prompt: priority is about latency, not the answer
    config = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    budget = ticket_budget(model_dir, prompt, config, blocks)
    with _console.status("earning enough points for a ticket"):
        key = scratch / "earner.key"
        payer, points = earn_until(swarm, model_dir, ledger_url, key, budget, prompt)
    with _console.status("starting a node for every block, to be loaded by free clients"):
        busy = swarm.start(model_dir, blocks=f"0:{blocks}", extra_args=["--ledger", ledger_url])
    (scratch / "load").mkdir()
    load = FreeLoad(swarm, model_dir, scratch / "load", busy.peer_id, prompt, config)
    with _console.status(f"3 free clients load node {busy.peer_id[-8:]}; paid and free generate"):
        run = paid_vs_free(load, payer.identity, ledger_url, budget, clients=3)
    bought = run.ticket
    shown = balances.get(payer.peer_id, 0)
    earned = (
        f"had {shown} points in the table above; more checked sessions brought it to {points}"
        if points != shown
        else f"has {points} points"
    )
    _console.print(
        f"node {payer.peer_id[-8:]} {earned}; it spends {bought.cost} of them on a ticket for "
        f"{bought.ticket.budget} block-tokens (balance left {points - bought.cost})"
    )
    table = Table(title=f"one node serving all blocks, loaded by {run.free_clients} free clients")
    for column in ("client", "ran at", "ms per token (median)", "p90"):
        table.add_column(column)
    for name, times, ran_at in (
        ("paid (ticket)", run.paid_times, run.ran_at),
        ("free", run.free_times, "free"),
    ):
        median, p90 = latency_ms(times)
        table.add_row(name, ran_at, f"{median:.1f}", f"{p90:.1f}")
    _console.print(table)
    _console.print(
        f"the paid client's steps went ahead of {run.overtook} free ones, pausing free steps "
        f"{run.preempted} times between two blocks"
    )
    same = "[green]yes[/green]" if run.same_text else "[red]NO[/red]"
    _console.print(f"same text for both: {same}; the node redeems the paid steps at the ledger")


def _show_nodes(
    api: LedgerClient, swarm: LocalSwarm, roles: dict[str, str], session: RemoteSession
) -> dict[str, int]:
    """Print each node's work and account; return the balances shown, by peer id."""
    steps = Counter(record.peer_id for record in session.log.work)
    shown: dict[str, int] = {}
    table = Table(title="nodes after the session")
    for column in ("node", "blocks", "role", "steps served", "points", "reputation", "slashed"):
        table.add_column(column)
    for node in swarm.nodes:
        account = api.account(_public_key(node))
        shown[node.peer_id] = account.balance if account else 0
        table.add_row(
            node.peer_id[-8:],
            node.args[node.args.index("--blocks") + 1],
            roles.get(node.peer_id, "?"),
            str(steps.get(node.peer_id, 0)),
            str(account.balance if account else 0),
            str(account.reputation if account else 0),
            "yes" if account and account.slashed else "",
        )
    _console.print(table)
    return shown


def _public_key(node: NodeProcess) -> bytes:
    return load_or_create_identity(node.identity).public_key


def demo(
    directory: Path = typer.Option(DEFAULT_DIR, "--dir", help="Where models and keys are kept."),
    family: str = typer.Option("bloom", help="bloom or llama."),
    prompt: str | None = typer.Option(
        None, help="The message (through the chat template of the real model; tiny: continued)."
    ),
    tiny: bool = typer.Option(
        False, "--tiny", help="Use the bundled tiny random model instead of SmolLM2-135M."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate."),
    kill_one: bool = typer.Option(
        True, "--kill-one/--no-kill-one", help="Kill a node half-way to show failover."
    ),
    cheat: bool = typer.Option(
        True, "--cheat/--no-cheat", help="Run one cheating node to show it caught and slashed."
    ),
    priority: bool = typer.Option(
        True, "--priority/--no-priority", help="Show a paid and a free client on a loaded node."
    ),
) -> None:
    """Run a whole local swarm with a ledger on a real trained model (or the tiny one)."""
    if max_new_tokens < 2:
        raise InvalidInput("max-new-tokens must be at least 2")
    run_demo(directory, family, prompt, max_new_tokens, kill_one, cheat, priority, tiny)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
