"""``corolla ledger ...``: serve a ledger, audit one, and read balances, histories, the top.

``register(app)`` adds the ``ledger`` sub-app to the ``corolla`` command. Expected errors are
:class:`~corolla.errors.CorollaError` and become one line at the top (``corolla.cli.main``); a
failed audit prints what failed, naming the first entry at fault, and exits with status 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from corolla.errors import InvalidInput
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.models import Account, Entry
from corolla.ledger.audit import AuditFailed, AuditReport, audit
from corolla.ledger.config import LedgerRules, ServiceLimits
from corolla.ledger.server import DEFAULT_PORT, ServeConfig, serve
from corolla.ledger.sources import DbSource, HttpSource, LogSource
from corolla.ledger.store import DEFAULT_ORIGIN
from corolla.verify.identity import load_identity
from corolla.verify.referee import RefereeConfig, RefereeFactory, RefereeLike

__all__ = ["ledger_app", "register"]

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"

ledger_app = typer.Typer(
    name="ledger",
    help="The Bloom points ledger: serve it, audit it, read it.",
    no_args_is_help=True,
)

Url = Annotated[str, typer.Option("--url", help="Ledger URL.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


_referee_factory: list[RefereeFactory] = []


def register(app: typer.Typer, referee_factory: RefereeFactory | None = None) -> None:
    """Add the ``ledger`` sub-command group to ``app``; ``referee_factory`` runs
    ``--referee-model`` (the command root passes the node's referee)."""
    _referee_factory[:] = [] if referee_factory is None else [referee_factory]
    app.add_typer(ledger_app, name="ledger")


def _make_referee(config: RefereeConfig) -> RefereeLike:
    if not _referee_factory:
        raise InvalidInput("this command was built without a referee: --referee-model is not here")
    return _referee_factory[0](config)


@ledger_app.command("serve")
def serve_command(
    db: Annotated[Path, typer.Option("--db", help="SQLite database (created if missing).")],
    key: Annotated[
        Path, typer.Option("--key", help="The ledger's identity key file (created if missing).")
    ] = Path(".corolla/ledger.key"),
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = DEFAULT_PORT,
    origin: Annotated[str, typer.Option("--origin", help="Name of the log.")] = DEFAULT_ORIGIN,
    credit: Annotated[
        int, typer.Option("--credit-per-block-token", help="Points per block-token (new logs).")
    ] = 1,
    price: Annotated[
        int, typer.Option("--ticket-price", help="Points per ticket block-token (new logs).")
    ] = 1,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Server processes (one writer at a time).")
    ] = 1,
    fee: Annotated[
        int,
        typer.Option(
            "--verifier-fee-permille",
            min=0,
            help="A verifier's fee per block-token it recomputes, in thousandths of the work "
            "credit (new logs).",
        ),
    ] = LedgerRules().verifier_fee_permille,
    min_reputation: Annotated[
        int,
        typer.Option(
            "--min-verifier-reputation",
            min=0,
            help="Reputation a verifier needs for its checks to count (new logs).",
        ),
    ] = LedgerRules().min_verifier_reputation,
    referee_model: Annotated[
        Path | None,
        typer.Option(
            "--referee-model",
            help="Judge fraud evidence by recomputing it with this model checkpoint.",
        ),
    ] = None,
    referee_max_tokens: Annotated[
        int, typer.Option("--referee-max-tokens", min=1, help="Most positions per recomputation.")
    ] = 8192,
    max_evidence_bytes: Annotated[
        int, typer.Option("--max-evidence-bytes", min=1024, help="Largest evidence body.")
    ] = ServiceLimits().max_evidence_body_bytes,
    seed_verifier: Annotated[
        list[str] | None,
        typer.Option(
            "--seed-verifier",
            help="Public key (hex) or key file of a verifier a new log trusts from its start "
            "(repeatable; needed when --min-verifier-reputation is above 0).",
        ),
    ] = None,
) -> None:
    """Serve a ledger over HTTP (OpenAPI document at /docs)."""
    rules = LedgerRules(
        credit_per_block_token=credit,
        ticket_price_per_block_token=price,
        verifier_fee_permille=fee,
        min_verifier_reputation=min_reputation,
    )
    referee = None if referee_model is None else RefereeConfig(referee_model, referee_max_tokens)
    judged = "no referee" if referee is None else f"referee model {referee_model}"
    typer.echo(
        f"ledger {origin} on http://{host}:{port} (docs at /docs), database {db}, {judged}",
        err=True,
    )
    serve(
        ServeConfig(
            db=db,
            key=key,
            host=host,
            port=port,
            origin=origin,
            rules=rules,
            limits=ServiceLimits(max_evidence_body_bytes=max_evidence_bytes),
            workers=workers,
            referee=referee,
            seed_verifiers=tuple(_account_key(text) for text in seed_verifier or ()),
        ),
        _referee_factory[0] if _referee_factory else None,
    )


@ledger_app.command("audit")
def audit_command(
    url: Annotated[str | None, typer.Option("--url", help="Audit the ledger at this URL.")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Audit a database file.")] = None,
    state: Annotated[
        Path | None,
        typer.Option("--state", help="Remember the checkpoint here; check consistency with it."),
    ] = None,
    referee_model: Annotated[
        Path | None,
        typer.Option(
            "--referee-model",
            help="Recompute the referee's convictions with this model checkpoint.",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Recompute the whole ledger from its log and check every signature and invariant."""
    if (url is None) == (db is None):
        raise InvalidInput("give exactly one of --url and --db")
    referee = None if referee_model is None else _make_referee(RefereeConfig(referee_model))
    source: LogSource = HttpSource(url) if url is not None else DbSource(db)  # type: ignore[arg-type]
    console = Console(stderr=True)
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=as_json,
            # No refresh thread: the audit forks its worker processes, which is only quick and
            # safe in a process running one thread (else they are spawned afresh).
            auto_refresh=False,
        ) as bar:
            tasks: dict[str, Any] = {}
            shown: dict[str, int] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(f"{phase} entries", total=total)
                    shown[phase] = -total
                if done - shown[phase] >= total // 200 or done == total:
                    shown[phase] = done
                    bar.update(tasks[phase], completed=done, total=total, refresh=True)

            report = audit(source, state, progress, referee)
    except AuditFailed as failure:
        if as_json:
            typer.echo(json.dumps({"ok": False, "entry": failure.seq, "error": str(failure)}))
        else:
            typer.secho(f"audit FAILED: {failure}", fg="red", err=True)
        raise typer.Exit(1) from None
    finally:
        source.close()
    if as_json:
        typer.echo(json.dumps(_report_dict(report)))
    else:
        Console().print(_report_table(report, remembered=state is not None))


@ledger_app.command("balance")
def balance_command(
    account: Annotated[str, typer.Argument(help="Public key (hex) or identity key file.")],
    url: Url = DEFAULT_URL,
    as_json: AsJson = False,
) -> None:
    """An account's balance and reputation."""
    key = _account_key(account)
    with LedgerClient(url) as client:
        found = client.account(key)
    if found is None:
        found = Account(key, "", 0, 0)
    if as_json:
        typer.echo(json.dumps(_account_dict(found)))
    else:
        slashed = "  SLASHED (earns nothing, not trusted as a verifier)" if found.slashed else ""
        typer.echo(
            f"{key.hex()}  balance {found.balance} points  reputation {found.reputation}{slashed}"
        )


@ledger_app.command("history")
def history_command(
    account: Annotated[str, typer.Argument(help="Public key (hex) or identity key file.")],
    url: Url = DEFAULT_URL,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: AsJson = False,
) -> None:
    """An account's entries, newest first."""
    key = _account_key(account)
    with LedgerClient(url) as client:
        entries = client.history(key, limit=limit)
    if as_json:
        typer.echo(json.dumps([_entry_dict(entry) for entry in entries]))
        return
    table = Table(title=f"history of {key.hex()[:16]}")
    for column in ("seq", "kind", "amount", "reference", "detail", "time (ms)"):
        table.add_column(column, justify="right" if column in ("seq", "amount") else "left")
    for entry in entries:
        table.add_row(
            str(entry.seq),
            entry.kind,
            str(entry.amount),
            entry.ref.hex()[:16],
            _detail(entry),
            str(entry.time),
        )
    Console().print(table)


@ledger_app.command("top")
def top_command(
    url: Url = DEFAULT_URL,
    by: Annotated[str, typer.Option("--by", help="balance or reputation")] = "balance",
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 10,
    as_json: AsJson = False,
) -> None:
    """The leaderboard."""
    if by not in ("balance", "reputation"):
        raise InvalidInput("--by must be balance or reputation")
    with LedgerClient(url) as client:
        accounts = client.top(by, limit)
    if as_json:
        typer.echo(json.dumps([_account_dict(account) for account in accounts]))
        return
    table = Table(title=f"top {limit} by {by}")
    for column in ("#", "account", "name", "balance", "reputation"):
        table.add_column(
            column, justify="right" if column in ("#", "balance", "reputation") else "left"
        )
    for rank, account in enumerate(accounts, start=1):
        table.add_row(
            str(rank),
            account.key.hex()[:16],
            account.name,
            str(account.balance),
            str(account.reputation),
        )
    Console().print(table)


@ledger_app.command("slash")
def slash_command(
    account: Annotated[str, typer.Argument(help="Public key (hex) or identity key file.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (stored in the log).")],
    key: Annotated[Path, typer.Option("--key", help="The ledger's own key file (operator).")],
    evidence: Annotated[
        str, typer.Option("--evidence", help="Digest of fraud evidence in the log (hex).")
    ],
    url: Url = DEFAULT_URL,
) -> None:
    """Operator: slash an account on logged (e.g. unjudged) fraud evidence: take its balance,
    zero its reputation, bar it from earning and from verifying."""
    target = _account_key(account)
    reference = _hex32(evidence, "--evidence")
    with LedgerClient(url, load_identity(key)) as client:
        taken = client.slash(target, reason, reference)
    typer.echo(f"slashed {target.hex()[:16]}: took {taken} points, reputation zeroed")


def _account_key(text: str) -> bytes:
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return bytes.fromhex(text)
    path = Path(text)
    if path.exists():
        return load_identity(path).public_key
    raise InvalidInput(f"{text!r} is neither a 64-digit hex public key nor a key file")


def _hex32(text: str, name: str) -> bytes:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise InvalidInput(f"{name} must be 64 lowercase hex digits")
    return bytes.fromhex(text)


def _account_dict(account: Account) -> dict[str, Any]:
    return {
        "account": account.key.hex(),
        "name": account.name,
        "balance": account.balance,
        "reputation": account.reputation,
        "slashed": account.slashed,
    }


def _entry_dict(entry: Entry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "kind": entry.kind,
        "account": entry.account.hex(),
        "amount": entry.amount,
        "ref": entry.ref.hex(),
        "detail": _detail(entry),
        "time": entry.time,
    }


def _detail(entry: Entry) -> str:
    """One line on what an entry means, from its payload."""
    payload = entry.payload if isinstance(entry.payload, dict) else {}
    short = {key: value.hex()[:16] for key, value in payload.items() if isinstance(value, bytes)}
    if entry.kind == "work_credited":
        return (
            f"session {short.get('session', '?')} of client {short.get('client', '?')}, "
            f"pair {payload.get('pair')}, checked by attestation {payload.get('attestation')}"
        )
    if entry.kind == "verifier_fee":
        return (
            f"checked node {short.get('node', '?')} for client {short.get('client', '?')}: "
            f"{payload.get('units')} block-tokens recomputed"
        )
    if entry.kind == "fraud_evidence":
        return f"{payload.get('verdict')} (by {payload.get('judge')}): {payload.get('reason')}"
    if entry.kind in ("slash", "reputation_changed"):
        return str(payload.get("reason", ""))
    if entry.kind == "ticket_redeemed":
        return f"{payload.get('units')} block-tokens of ticket {short.get('ticket', '?')}"
    return ""


def _report_dict(report: AuditReport) -> dict[str, Any]:
    return {
        "ok": True,
        "source": report.source,
        "origin": report.origin,
        "ledger_key": report.ledger_key.hex(),
        "tree_size": report.tree_size,
        "root_hash": report.root_hash.hex(),
        "operations": report.operations,
        "entries_by_kind": dict(report.kinds),
        "pairs_verified": report.pairs_verified,
        "attestations_verified": report.attestations_verified,
        "evidence_checked": report.evidence_checked,
        "referee_recomputed": report.referee_recomputed,
        "accounts": report.accounts,
        "points": report.points,
        "consistent_with": report.consistent_with,
        "cached_state_compared": report.cached_state_compared,
    }


def _report_table(report: AuditReport, *, remembered: bool) -> Table:
    table = Table(title=f"audit of {report.origin} passed", show_header=False)
    table.add_column("check")
    table.add_column("result")
    table.add_row("ledger key", report.ledger_key.hex())
    table.add_row("entries (tree size)", str(report.tree_size))
    table.add_row("root hash", report.root_hash.hex())
    table.add_row("signed operations verified", str(report.operations))
    table.add_row("receipts re-verified", str(report.pairs_verified))
    table.add_row("attestations re-verified", str(report.attestations_verified))
    table.add_row("fraud evidence re-checked", str(report.evidence_checked))
    if report.referee_recomputed:
        table.add_row("referee convictions recomputed", str(report.referee_recomputed))
    for kind, count in sorted(report.kinds.items()):
        table.add_row(f"  {kind}", str(count))
    table.add_row("accounts", str(report.accounts))
    table.add_row("points in circulation", str(report.points))
    if report.consistent_with is not None:
        consistent = f"consistent with size {report.consistent_with}"
    else:
        consistent = "first audit (state saved)" if remembered else "not compared (no --state)"
    table.add_row("history", consistent)
    table.add_row(
        "cached balances",
        "match the log" if report.cached_state_compared else "not compared (log moved on)",
    )
    return table
