"""``corolla ledger ...``: serve a ledger, audit one, read balances, histories, the top, and (the
operator) slash on logged evidence and publish a model's tolerances.

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
from corolla.ledger.api.models import Account
from corolla.ledger.audit import AuditFailed, audit
from corolla.ledger.config import LedgerRules, ServiceLimits
from corolla.ledger.server import DEFAULT_PORT, ServeConfig, ServeOptions, serve
from corolla.ledger.sources import DbSource, HttpSource, LogSource
from corolla.ledger.store import DEFAULT_ORIGIN
from corolla.ledger.views import entry_detail, entry_dict, report_dict, report_table
from corolla.verify.identity import load_identity
from corolla.verify.referee import RefereeConfig, RefereeFactory, RefereeLike

__all__ = ["ledger_app", "register", "run_serve", "serving_line"]

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


# The serve command's form: one annotated type per option, then one line per option below.
DbOption = Annotated[Path, typer.Option("--db", help="SQLite database (created if missing).")]
KeyOption = Annotated[
    Path, typer.Option("--key", help="The ledger's identity key file (created if missing).")
]
HostOption = Annotated[str, typer.Option("--host")]
PortOption = Annotated[int, typer.Option("--port")]
OriginOption = Annotated[str, typer.Option("--origin", help="Name of the log.")]
CreditOption = Annotated[
    int, typer.Option("--credit-per-block-token", help="Points per block-token (new logs).")
]
PriceOption = Annotated[
    int, typer.Option("--ticket-price", help="Points per ticket block-token (new logs).")
]
WorkersOption = Annotated[
    int, typer.Option("--workers", min=1, help="Server processes (one writer at a time).")
]
FeeOption = Annotated[
    int,
    typer.Option(
        "--verifier-fee-permille",
        min=0,
        help="A verifier's fee per block-token it recomputes, in thousandths of the work "
        "credit (new logs).",
    ),
]
ReputationOption = Annotated[
    int,
    typer.Option(
        "--min-verifier-reputation",
        min=0,
        help="Reputation a verifier needs for its checks to count (new logs).",
    ),
]
RefereeOption = Annotated[
    Path | None,
    typer.Option(
        "--referee-model", help="Judge fraud evidence by recomputing it with this model checkpoint."
    ),
]
RefereeTokensOption = Annotated[
    int, typer.Option("--referee-max-tokens", min=1, help="Most positions per recomputation.")
]
EvidenceBytesOption = Annotated[
    int, typer.Option("--max-evidence-bytes", min=1024, help="Largest evidence body.")
]
BeaconOption = Annotated[
    int,
    typer.Option(
        "--beacon-period-s",
        min=1,
        help="Seconds per beacon epoch: checks are assigned by each epoch's beacon (new logs).",
    ),
]
SeedOption = Annotated[
    list[str] | None,
    typer.Option(
        "--seed-verifier",
        help="Public key (hex) or key file of a verifier a new log trusts from its start "
        "(repeatable; needed when --min-verifier-reputation is above 0).",
    ),
]
_RULES, _LIMITS = LedgerRules(), ServiceLimits()


@ledger_app.command("serve")
def serve_command(
    db: DbOption,
    key: KeyOption = Path(".corolla/ledger.key"),
    host: HostOption = "127.0.0.1",
    port: PortOption = DEFAULT_PORT,
    origin: OriginOption = DEFAULT_ORIGIN,
    credit: CreditOption = _RULES.credit_per_block_token,
    price: PriceOption = _RULES.ticket_price_per_block_token,
    workers: WorkersOption = 1,
    fee: FeeOption = _RULES.verifier_fee_permille,
    min_reputation: ReputationOption = _RULES.min_verifier_reputation,
    beacon_period: BeaconOption = _RULES.beacon_period_s,
    referee_model: RefereeOption = None,
    referee_max_tokens: RefereeTokensOption = 8192,
    max_evidence_bytes: EvidenceBytesOption = _LIMITS.max_evidence_body_bytes,
    seed_verifier: SeedOption = None,
) -> None:
    """Serve a ledger over HTTP (OpenAPI document at /docs)."""
    options = ServeOptions(
        db=db,
        key=key,
        host=host,
        port=port,
        origin=origin,
        credit_per_block_token=credit,
        ticket_price=price,
        verifier_fee_permille=fee,
        min_verifier_reputation=min_reputation,
        beacon_period_s=beacon_period,
        workers=workers,
        referee_model=referee_model,
        referee_max_tokens=referee_max_tokens,
        max_body_bytes=_LIMITS.max_body_bytes,
        max_evidence_bytes=max_evidence_bytes,
        seed_verifiers=tuple(_account_key(text) for text in seed_verifier or ()),
    )
    run_serve(options)


def run_serve(options: ServeOptions) -> None:
    """Say what is served, then serve it until interrupted."""
    config = options.config()
    typer.echo(serving_line(config), err=True)
    serve(config, _referee_factory[0] if _referee_factory else None)


def serving_line(config: ServeConfig) -> str:
    """The one line ``corolla ledger serve`` prints on start."""
    judged = "no referee" if config.referee is None else f"referee model {config.referee.model_dir}"
    return (
        f"ledger {config.origin} on http://{config.host}:{config.port} (docs at /docs), "
        f"database {config.db}, {judged}"
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
        typer.echo(json.dumps(report_dict(report)))
    else:
        Console().print(report_table(report, remembered=state is not None))


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
        typer.echo(json.dumps(found.to_dict()))
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
        typer.echo(json.dumps([entry_dict(entry) for entry in entries]))
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
            entry_detail(entry),
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
        typer.echo(json.dumps([account.to_dict() for account in accounts]))
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


@ledger_app.command("publish-tolerance")
def publish_tolerance_command(
    file: Annotated[
        Path, typer.Argument(help="A corolla-tolerance.json (corolla model calibrate writes it).")
    ],
    key: Annotated[Path, typer.Option("--key", help="The ledger's own key file (operator).")],
    url: Url = DEFAULT_URL,
) -> None:
    """Operator: publish a model's measured tolerances in the log, so the ledger and every
    verifier hold checks of that model to the same thresholds."""
    from corolla.verify.tolerance import load_calibrations

    calibrations = list(load_calibrations(file).values())
    with LedgerClient(url, load_identity(key)) as client:
        result = client.publish_calibrations(calibrations)
    for calibration in calibrations:
        typer.echo(
            f"published {calibration.profile} of model {calibration.model_digest.hex()[:16]}: "
            f"threshold {calibration.threshold:.3g} (honest max {calibration.honest_max:.3g} "
            f"x {calibration.threshold_margin:g}), entries {result['entries']}"
        )


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
