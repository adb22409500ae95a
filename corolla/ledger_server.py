"""``python -m corolla.ledger_server``: the ledger service, wired with the node's referee, without
loading the whole ``corolla`` command (it starts in about a second; harnesses and tests use it)."""

from __future__ import annotations

from corolla.ledger.server import main as serve_main
from corolla.verify.referee import RefereeConfig, RefereeLike

__all__ = ["load_referee", "main"]


def load_referee(config: RefereeConfig) -> RefereeLike:
    """The node's referee for ``config`` (imported only when a referee is configured)."""
    from corolla.node.referee import Referee

    return Referee(config)


def main() -> None:
    serve_main(referee_factory=load_referee)


if __name__ == "__main__":
    main()
