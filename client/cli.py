"""`corolla generate`: text from a prompt, locally or through the swarm."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import typer
from rich.console import Console

from corolla.client.generation import Backbone, GenerationConfig, generate
from corolla.client.head import ClientHead, load_head
from corolla.client.local import LocalBackbone, even_splits
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.priority import DEFAULT_WALLET, PriorityConfig, TicketWallet, trusted_keys
from corolla.client.remote import RemoteSession
from corolla.client.reporting import report_session
from corolla.client.session import WorkRecord
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import DEFAULT_CLIENT_IDENTITY, ClientConfig
from corolla.errors import InvalidInput, RouteUnavailable
from corolla.ledger.api.client import LedgerClient
from corolla.node.model.checkpoint import parse_span
from corolla.verify.identity import load_or_create_identity

__all__ = ["register"]

_status = Console(stderr=True)


class TextStream:
    """Prints generated text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, head: ClientHead, enabled: bool) -> None:
        self._head = head
        self._enabled = enabled
        self._ids: list[int] = []
        self._printed = 0

    def rewind(self, kept: int) -> None:
        """A node was caught cheating: everything after `kept` tokens is regenerated."""
        self._ids = self._ids[:kept]
        self._printed = 0
        if self._enabled:
            text = self._head.tokenizer.decode(self._ids, skip_special_tokens=True)
            _status.print(
                "\n[yellow]a spot-check caught a node returning wrong activations; it is banned "
                f"and the text is regenerated from token {kept}:[/yellow]"
            )
            sys.stdout.write(text)
            sys.stdout.flush()
            self._printed = len(text)

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
    initial_peers: list[str] = typer.Option(
        [], "--initial-peers", help="Multiaddr of a swarm member (repeat, or separate by commas)."
    ),
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
    receipts: Path | None = typer.Option(
        None, "--receipts", help="Write every verified (request, receipt) pair as JSON lines."
    ),
    identity: Path = typer.Option(
        DEFAULT_CLIENT_IDENTITY, "--identity", help="The client's Ed25519 key file."
    ),
    allow: list[str] = typer.Option([], "--allow", help="Use only these peer ids (repeat)."),
    block: list[str] = typer.Option([], "--block", help="Never use these peer ids (repeat)."),
    step_timeout: float = typer.Option(30.0, "--step-timeout", help="Seconds per node step."),
    check_rate: float = typer.Option(
        0.05, "--check-rate", help="Fraction of steps spot-checked on a second peer (0 = off)."
    ),
    ledger: str | None = typer.Option(
        None, "--ledger", help="Ledger URL: report the work, checks and caught cheaters there."
    ),
    priority: str = typer.Option(
        "free", "--priority", help="free, or high: pay points for a ticket and trusted peers."
    ),
    min_reputation: int = typer.Option(
        1, "--min-reputation", help="With --priority high: the reputation a peer needs."
    ),
    fallback_free: bool = typer.Option(
        False, "--fallback-free", help="With --priority high: use the free route if no trusted one."
    ),
    ticket_budget: int = typer.Option(
        PriorityConfig.budget,
        "--ticket-budget",
        help="With --priority high: block-tokens (= points) a newly bought ticket holds.",
    ),
    wallet: Path = typer.Option(
        DEFAULT_WALLET, "--wallet", help="With --priority high: where bought tickets are kept."
    ),
) -> None:
    """Generate text after PROMPT, streamed to the terminal as it is produced."""
    if not prompt:
        raise InvalidInput("the prompt is empty: give some text to continue")
    peers = tuple(p for item in initial_peers for p in item.split(",") if p)
    if local == bool(peers):
        raise InvalidInput("give either --local or --initial-peers ADDR (where the swarm is)")
    if priority not in ("free", "high"):
        raise InvalidInput("--priority is free or high")
    if priority == "high" and ledger is None:
        raise InvalidInput("--priority high needs --ledger URL (tickets are bought there)")
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
    remote: DistributedModelForCausalLM | None = None
    with _status.status("loading the model", spinner="dots"):
        if local:
            head = load_head(model)
            chosen = (
                [parse_span(part) for part in splits.split(",")]
                if splits
                else even_splits(head.num_blocks, spans)
            )
            backbone: Backbone = LocalBackbone.load(model, chosen)
        else:
            client_config = ClientConfig(
                initial_peers=peers,
                identity=identity,
                allow=frozenset(allow),
                block=frozenset(block),
                step_timeout=step_timeout,
            )
            paid = (
                PriorityConfig(
                    ledger_url=ledger,
                    budget=ticket_budget,
                    min_budget_left=min(ticket_budget, PriorityConfig.min_budget_left),
                    min_reputation=min_reputation,
                    wallet=wallet,
                )
                if priority == "high" and ledger is not None
                else None
            )
            rate = max(check_rate, paid.check_rate) if paid is not None else check_rate
            checks = SpotCheckConfig(rate=rate) if rate > 0 else None
            remote = DistributedModelForCausalLM.from_pretrained(
                model, config=client_config, checks=checks
            )
            head, backbone = remote.head, remote.backbone
            if paid is not None:
                try:
                    _buy_priority(remote, paid, identity, fallback_free)
                except BaseException:
                    remote.close()
                    raise
    try:
        loaded = time.perf_counter()
        input_ids = head.tokenizer(prompt, return_tensors="pt").input_ids  # 1, prompt
        stream = TextStream(head, enabled=not as_json)
        if not as_json:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        new_ids = generate(
            head, backbone, input_ids, config, on_tokens=stream, on_rewind=stream.rewind
        )[0]
        finished = time.perf_counter()
        session = remote.backbone.last_session if remote is not None else None
    finally:
        if remote is not None:
            remote.close()
    text = head.tokenizer.decode(new_ids.tolist(), skip_special_tokens=True)
    swarm_summary = _swarm_summary(session) if session is not None else None
    if ledger is not None and session is not None and swarm_summary is not None:
        swarm_summary["ledger"] = _report(ledger, identity, session)
    if receipts is not None:
        if session is None:
            raise InvalidInput("--receipts needs the swarm: local generation signs nothing")
        _write_work(receipts, session.work)
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
        if swarm_summary is not None:
            result["swarm"] = swarm_summary
        typer.echo(json.dumps(result))
    else:
        sys.stdout.write("\n")
        if swarm_summary is not None:
            _print_summary(swarm_summary)


def _swarm_summary(session: RemoteSession) -> dict[str, object]:
    return {
        "route": [
            {"peer_id": hop.peer_id, "blocks": [hop.start, hop.end]} for hop in session.route
        ],
        "verified_receipts": len(session.work),
        "priority": dict(session.granted),
        "priority_notes": list(session.priority_notes),
        "spot_checks": [
            {
                "peer_id": c.peer_id,
                "blocks": [c.start, c.end],
                "steps": c.steps,
                "verdict": c.verdict,
                "verifiers": list(c.verifiers),
                "note": c.note,
            }
            for c in session.checks
        ],
        "failovers": [
            {
                "peer_id": f.peer_id,
                "blocks": [f.start, f.end],
                "reason": f.reason,
                "replacements": list(f.replacements),
            }
            for f in session.failovers
        ],
    }


def _print_summary(summary: dict[str, object]) -> None:
    route = " -> ".join(
        f"{hop['peer_id'][-8:]}[{hop['blocks'][0]}:{hop['blocks'][1]}]"  # type: ignore[index]
        for hop in summary["route"]  # type: ignore[attr-defined]
    )
    _status.print(f"route: {route}")
    _status.print(f"verified receipts: {summary['verified_receipts']}")
    granted = summary["priority"]
    if any(level == "high" for level in granted.values()):  # type: ignore[attr-defined]
        levels = ", ".join(f"{peer[-8:]} {level}" for peer, level in granted.items())  # type: ignore[attr-defined]
        _status.print(f"priority: {levels}")
    for note in summary["priority_notes"]:  # type: ignore[attr-defined]
        _status.print(f"[yellow]priority note from {note}[/yellow]")
    checks = summary["spot_checks"]
    verdicts = Counter(check["verdict"] for check in checks)  # type: ignore[index,union-attr]
    if checks:
        _status.print(
            "spot-checks: " + ", ".join(f"{count} {verdict}" for verdict, count in verdicts.items())
        )
    report = summary.get("ledger")
    if isinstance(report, dict):
        _status.print(
            f"reported {report['pairs']} receipts and {report['attestations']} spot-checks "
            "to the ledger"
        )
        for verdict in report["evidence"]:
            _status.print(f"evidence against {verdict['accused'][:16]}: {verdict['verdict']}")
    for failover in summary["failovers"]:  # type: ignore[attr-defined]
        _status.print(
            f"failover: {failover['peer_id'][-8:]} blocks {failover['blocks']} replaced by "
            f"{', '.join(p[-8:] for p in failover['replacements'])} ({failover['reason']})"
        )


def _buy_priority(
    remote: DistributedModelForCausalLM,
    paid: PriorityConfig,
    identity_path: Path,
    fallback_free: bool,
) -> None:
    """Attach a ticket and restrict the route to trusted peers; say what it costs."""
    identity = load_or_create_identity(identity_path)
    backbone = remote.backbone
    manifest = backbone.manifest
    with LedgerClient(paid.ledger_url, identity) as client:
        records = backbone.run(backbone.swarm.servers(manifest.model_digest, manifest.num_blocks))
        try:
            backbone.swarm.trusted = trusted_keys(client, records, paid.min_reputation)
            backbone.run(
                backbone.swarm.route(
                    manifest.model_digest, manifest.num_blocks, 0, manifest.num_blocks
                )
            )
        except RouteUnavailable as error:
            backbone.swarm.trusted = None
            if not fallback_free:
                raise RouteUnavailable(
                    f"no trusted route covers the model ({error}); run without --priority high, "
                    "or add --fallback-free, to use the free route"
                ) from None
            _status.print(f"[yellow]no trusted route ({error}); using the free route[/yellow]")
            return
        bought = TicketWallet(paid.wallet, client).ticket_for(paid, identity.public_key)
    backbone.ticket = bought.ticket
    action = f"bought for {bought.cost} points" if bought.bought else "reused"
    _status.print(
        f"priority ticket {bought.ticket.digest().hex()[:12]} {action}: "
        f"{bought.budget_left} of {bought.ticket.budget} block-tokens left, "
        f"trusted peers: {len(backbone.swarm.trusted or ())}"
    )


def _report(url: str, identity_path: Path, session: RemoteSession) -> dict[str, object]:
    with LedgerClient(url, load_or_create_identity(identity_path)) as client:
        summary = report_session(client, session.work, session.checks)
    return {
        "pairs": summary.pairs,
        "attestations": summary.attestations,
        "evidence": [
            {"accused": v.accused.hex(), "verdict": v.verdict, "reason": v.reason}
            for v in summary.verdicts
        ],
        "evidence_refused": summary.refused,
    }


def _write_work(path: Path, work: list[WorkRecord]) -> None:
    temp = path.with_name(path.name + ".tmp")
    with temp.open("w") as file:
        for record in work:
            file.write(json.dumps(record.to_dict()) + "\n")
    temp.replace(path)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
