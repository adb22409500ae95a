"""Run the ledger service: ``python -m corolla.ledger.server --db PATH --key PATH`` (the same
as ``corolla ledger serve``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from corolla.errors import CorollaError
from corolla.ledger.app import create_app
from corolla.ledger.config import LedgerRules, ServiceLimits
from corolla.ledger.store import DEFAULT_ORIGIN, LedgerStore
from corolla.verify.identity import load_identity, load_or_create_identity

__all__ = ["ServeConfig", "main", "serve"]

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


def serve(config: ServeConfig) -> None:
    """Open (or create) the ledger and serve it until interrupted."""
    identity = load_or_create_identity(config.key)
    store = LedgerStore(
        config.db, identity, origin=config.origin, rules=config.rules, limits=config.limits
    )
    if config.workers > 1:
        store.close()  # the log exists now: the workers only open it
        os.environ[_CONFIG_VARIABLE] = json.dumps(
            {
                "db": str(config.db),
                "key": str(config.key),
                "origin": config.origin,
                "rules": config.rules.to_dict(),
                "max_body_bytes": config.limits.max_body_bytes,
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
    store = LedgerStore(
        Path(settings["db"]),
        load_identity(Path(settings["key"])),
        origin=settings["origin"],
        rules=LedgerRules.from_dict(settings["rules"]),
        limits=ServiceLimits(max_body_bytes=settings["max_body_bytes"]),
    )
    return create_app(store)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry of ``python -m corolla.ledger.server``."""
    parser = argparse.ArgumentParser(prog="python -m corolla.ledger.server")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--origin", default=DEFAULT_ORIGIN)
    parser.add_argument("--credit-per-block-token", type=int, default=1)
    parser.add_argument("--ticket-price", type=int, default=1)
    parser.add_argument("--max-body-bytes", type=int, default=ServiceLimits().max_body_bytes)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        config = ServeConfig(
            db=args.db,
            key=args.key,
            host=args.host,
            port=args.port,
            origin=args.origin,
            rules=LedgerRules(
                credit_per_block_token=args.credit_per_block_token,
                ticket_price_per_block_token=args.ticket_price,
            ),
            limits=ServiceLimits(max_body_bytes=args.max_body_bytes),
            workers=max(1, args.workers),
        )
        serve(config)
    except CorollaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
