"""Run the ledger service (``corolla ledger serve``; ``python -m corolla.ledger_server`` starts
faster, for harnesses).

A referee (a process recomputing accused spans) is not the ledger's own code: whoever starts the
server hands it a :data:`~corolla.verify.referee.RefereeFactory` (the command root passes the
node's :class:`~corolla.node.referee.Referee`). Worker processes of a multi-process server find
the same factory by its import path."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from corolla.errors import CorollaError, InvalidInput
from corolla.ledger.app import create_app
from corolla.ledger.config import LedgerRules, ServiceLimits
from corolla.ledger.store import DEFAULT_ORIGIN, LedgerStore
from corolla.verify.identity import load_identity, load_or_create_identity
from corolla.verify.referee import RefereeConfig, RefereeFactory, RefereeLike

__all__ = ["ServeConfig", "ServeOptions", "main", "serve"]

DEFAULT_PORT = 8470
_CONFIG_VARIABLE = "COROLLA_LEDGER_SERVE"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Where and how to serve a ledger."""

    db: Path
    key: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    origin: str = DEFAULT_ORIGIN
    rules: LedgerRules = field(default_factory=LedgerRules)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    workers: int = 1
    """Server processes. They check signatures in parallel and take turns writing (SQLite's
    write lock serialises the transactions), so more than one pays on a multi-core machine."""
    referee: RefereeConfig | None = None
    """Judge fraud evidence by recomputing it with this model (each worker loads its own)."""
    seed_verifiers: tuple[bytes, ...] = ()
    """Verifiers a new log trusts from its genesis (see ``LedgerRules.min_verifier_reputation``)."""


_RULES, _LIMITS = LedgerRules(), ServiceLimits()


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """The serve command's options, one field per flag, as the user gave them (``corolla
    ledger serve`` and ``python -m corolla.ledger_server`` both fill every field, each with its
    own defaults): :meth:`config` is the one place they become a :class:`ServeConfig`."""

    db: Path
    key: Path
    host: str
    port: int
    origin: str
    credit_per_block_token: int
    ticket_price: int
    verifier_fee_permille: int
    min_verifier_reputation: int
    beacon_period_s: int
    workers: int
    referee_model: Path | None
    referee_max_tokens: int
    max_body_bytes: int
    max_evidence_bytes: int
    seed_verifiers: tuple[bytes, ...]

    def config(self) -> ServeConfig:
        """The nested configuration these options describe (rules of a new log, limits,
        the referee when a model is named)."""
        return ServeConfig(
            db=self.db,
            key=self.key,
            host=self.host,
            port=self.port,
            origin=self.origin,
            rules=LedgerRules(
                credit_per_block_token=self.credit_per_block_token,
                ticket_price_per_block_token=self.ticket_price,
                verifier_fee_permille=self.verifier_fee_permille,
                min_verifier_reputation=self.min_verifier_reputation,
                beacon_period_s=self.beacon_period_s,
            ),
            limits=ServiceLimits(
                max_body_bytes=self.max_body_bytes,
                max_evidence_body_bytes=self.max_evidence_bytes,
            ),
            workers=self.workers,
            referee=None
            if self.referee_model is None
            else RefereeConfig(self.referee_model, self.referee_max_tokens),
            seed_verifiers=self.seed_verifiers,
        )


def serve(config: ServeConfig, referee_factory: RefereeFactory | None = None) -> None:
    """Open (or create) the ledger and serve it until interrupted. ``referee_factory`` builds
    the referee of ``config.referee`` (required when one is configured)."""
    identity = load_or_create_identity(config.key)
    if config.referee is not None and referee_factory is None:
        raise InvalidInput("a referee is configured but this entry point cannot run one")
    referee = (
        None
        if config.referee is None or config.workers > 1 or referee_factory is None
        else referee_factory(config.referee)
    )
    store = LedgerStore(
        config.db,
        identity,
        origin=config.origin,
        rules=config.rules,
        limits=config.limits,
        referee=referee,
        seed_verifiers=config.seed_verifiers,
    )
    if config.workers > 1:
        store.close()  # the log exists now: the workers only open it
        os.environ[_CONFIG_VARIABLE] = json.dumps(
            {
                "db": str(config.db),
                "key": str(config.key),
                "origin": config.origin,
                "rules": config.rules.to_dict(),
                "limits": asdict(config.limits),
                "referee": None if config.referee is None else _referee_dict(config.referee),
                "referee_factory": None
                if referee_factory is None
                else f"{referee_factory.__module__}:{referee_factory.__qualname__}",
            }
        )
        uvicorn.run(
            f"{__name__}:app_from_environment",
            factory=True,
            workers=config.workers,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        return
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(store),
                host=config.host,
                port=config.port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        server.run()
    finally:
        store.close()


def app_from_environment() -> Any:
    """The app of one worker process of a multi-process server (configured by ``serve``)."""
    settings = json.loads(os.environ[_CONFIG_VARIABLE])
    referee: RefereeLike | None = None
    if settings["referee"] is not None:
        module, _, name = settings["referee_factory"].partition(":")
        factory = getattr(importlib.import_module(module), name)
        referee = factory(RefereeConfig(Path(settings["referee"]["model_dir"]),
                                        settings["referee"]["max_tokens"]))  # fmt: skip
    store = LedgerStore(
        Path(settings["db"]),
        load_identity(Path(settings["key"])),
        origin=settings["origin"],
        rules=LedgerRules.from_dict(settings["rules"]),
        limits=ServiceLimits(**settings["limits"]),
        referee=referee,
    )
    return create_app(store)


def _hex_key(text: str) -> bytes:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise InvalidInput(f"{text!r} is not a 64-digit lowercase hex public key")
    return bytes.fromhex(text)


def _referee_dict(config: RefereeConfig) -> dict[str, Any]:
    return {"model_dir": str(config.model_dir), "max_tokens": config.max_tokens}


def main(argv: Sequence[str] | None = None, referee_factory: RefereeFactory | None = None) -> None:
    """The quick-starting command line (``python -m corolla.ledger_server``): the same options
    as ``corolla ledger serve`` without loading the rest of the command."""
    parser = argparse.ArgumentParser(prog="python -m corolla.ledger_server")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--origin", default=DEFAULT_ORIGIN)
    parser.add_argument("--credit-per-block-token", type=int, default=_RULES.credit_per_block_token)
    parser.add_argument("--ticket-price", type=int, default=_RULES.ticket_price_per_block_token)
    parser.add_argument("--verifier-fee-permille", type=int, default=_RULES.verifier_fee_permille)
    parser.add_argument(
        "--min-verifier-reputation", type=int, default=_RULES.min_verifier_reputation
    )
    parser.add_argument("--beacon-period-s", type=int, default=_RULES.beacon_period_s)
    parser.add_argument("--max-body-bytes", type=int, default=_LIMITS.max_body_bytes)
    parser.add_argument("--max-evidence-bytes", type=int, default=_LIMITS.max_evidence_body_bytes)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--referee-model", type=Path, default=None)
    parser.add_argument("--referee-max-tokens", type=int, default=8192)
    parser.add_argument("--seed-verifier", action="append", default=[], metavar="HEX_KEY")
    args = parser.parse_args(argv)
    try:
        options = ServeOptions(
            db=args.db,
            key=args.key,
            host=args.host,
            port=args.port,
            origin=args.origin,
            credit_per_block_token=args.credit_per_block_token,
            ticket_price=args.ticket_price,
            verifier_fee_permille=args.verifier_fee_permille,
            min_verifier_reputation=args.min_verifier_reputation,
            beacon_period_s=args.beacon_period_s,
            workers=max(1, args.workers),
            referee_model=args.referee_model,
            referee_max_tokens=args.referee_max_tokens,
            max_body_bytes=args.max_body_bytes,
            max_evidence_bytes=args.max_evidence_bytes,
            seed_verifiers=tuple(_hex_key(text) for text in args.seed_verifier),
        )
        serve(options.config(), referee_factory)
    except CorollaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
