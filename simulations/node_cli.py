"""``corolla simulate node --adversary NAME``: a node that misbehaves on purpose.

Same options as ``corolla node run`` plus ``--adversary`` (see
:mod:`corolla.simulations.adversaries`). For tests, simulations and demos only: the production
``corolla node run`` has no way to switch misbehaviour on.
"""

from __future__ import annotations

from typing import Annotated

import typer

from corolla.node.run_cli import (
    BlocksOption,
    HostOption,
    IdentityOption,
    IdleTimeoutOption,
    InitialPeersOption,
    MaxCacheTokensOption,
    MaxRequestBytesOption,
    ModelOption,
    NumBlocksOption,
    PortOption,
    QuantOption,
    RefreshPeriodOption,
    node_config,
)
from corolla.node.server import DEFAULT_IDENTITY, run_node
from corolla.node.sessions import SessionConfig
from corolla.node.wire import WireLimits
from corolla.simulations.adversaries import ADVERSARIES, make_behaviour

__all__ = ["register_simulate", "simulate_app"]

simulate_app = typer.Typer(
    help="Adversarial simulations and misbehaving nodes.", no_args_is_help=True
)

AdversaryOption = Annotated[
    str, typer.Option("--adversary", help=f"One of: {', '.join(ADVERSARIES)} (or honest).")
]

_DEFAULT_LIMITS = WireLimits()
_DEFAULT_SESSIONS = SessionConfig()


@simulate_app.command("node")
def node(
    model: ModelOption,
    adversary: AdversaryOption,
    blocks: BlocksOption = None,
    num_blocks: NumBlocksOption = None,
    initial_peers: InitialPeersOption = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 0,
    identity: IdentityOption = DEFAULT_IDENTITY,
    quant: QuantOption = "none",
    max_cache_tokens: MaxCacheTokensOption = _DEFAULT_SESSIONS.max_cache_tokens,
    refresh_period: RefreshPeriodOption = 30.0,
    idle_timeout: IdleTimeoutOption = _DEFAULT_SESSIONS.idle_timeout,
    max_request_bytes: MaxRequestBytesOption = _DEFAULT_LIMITS.max_tensor_bytes,
) -> None:
    """Run a node that misbehaves as ADVERSARY (same options as `corolla node run`)."""
    behaviour = make_behaviour(adversary)
    config = node_config(
        model=model,
        blocks=blocks,
        num_blocks=num_blocks,
        initial_peers=initial_peers,
        host=host,
        port=port,
        identity=identity,
        quant=quant,
        max_cache_tokens=max_cache_tokens,
        refresh_period=refresh_period,
        idle_timeout=idle_timeout,
        max_request_bytes=max_request_bytes,
    )
    typer.echo(f"simulated adversary: {behaviour.name}")
    run_node(config, behaviour)


def register_simulate(app: typer.Typer) -> None:
    """Add the ``simulate`` sub-app (with ``simulate node``) to the root command."""
    app.add_typer(simulate_app, name="simulate")
