"""``corolla simulate node --adversary NAME``: a node that misbehaves on purpose.

Same options as ``corolla node run`` plus ``--adversary`` and the strategies' settings (see
:mod:`corolla.simulations.adversaries`). For tests, simulations and demos only: the production
``corolla node run`` has no way to switch misbehaviour on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corolla.node.run_cli import (
    BlocksOption,
    HostOption,
    IdentityOption,
    IdleTimeoutOption,
    InitialPeersOption,
    LedgerKeyOption,
    LedgerOption,
    MaxCacheTokensOption,
    MaxFreeQueueOption,
    MaxQueueOption,
    MaxRequestBytesOption,
    ModelOption,
    NumBlocksOption,
    PortOption,
    QuantOption,
    RefreshPeriodOption,
    node_config,
)
from corolla.node.scheduler import SchedulerConfig
from corolla.node.server import DEFAULT_IDENTITY, run_node
from corolla.node.sessions import SessionConfig
from corolla.node.wire import WireLimits
from corolla.simulations.adversaries import ADVERSARIES, AdversaryOptions, make_behaviour

__all__ = ["register_simulate", "simulate_app"]

simulate_app = typer.Typer(
    help="Adversarial simulations and misbehaving nodes.", no_args_is_help=True
)

AdversaryOption = Annotated[
    str, typer.Option("--adversary", help=f"One of: {', '.join(ADVERSARIES)} (or honest).")
]
PerturbationOption = Annotated[
    float | None,
    typer.Option(
        "--perturbation",
        help="noise, subtle: noise size relative to each token's RMS (default 0.5, 1e-2).",
    ),
]
CheatWithOption = Annotated[
    str | None,
    typer.Option("--cheat-with", help="selective: the strategy it cheats with (default noise)."),
]
CheatFractionOption = Annotated[
    float | None,
    typer.Option("--cheat-fraction", help="selective: share of steps it cheats on (0..1)."),
]
TargetClientOption = Annotated[
    str | None,
    typer.Option(
        "--target-client", help="selective: cheat only for client keys with this hex prefix."
    ),
]
WrongModelOption = Annotated[
    Path | None,
    typer.Option("--wrong-model", help="wrong-model: checkpoint whose weights it computes with."),
]
WrongQuantOption = Annotated[
    str | None,
    typer.Option("--wrong-quant", help="wrong-quant: nf4 (default) or int8, computed in secret."),
]
SeedOption = Annotated[
    int | None, typer.Option("--seed", help="Seed of the adversary's random choices (default 0).")
]

_DEFAULT_LIMITS = WireLimits()
_DEFAULT_SESSIONS = SessionConfig()
_DEFAULT_QUEUE = SchedulerConfig()


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
    ledger: LedgerOption = None,
    ledger_key: LedgerKeyOption = None,
    max_queue: MaxQueueOption = _DEFAULT_QUEUE.max_queue,
    max_free_queue: MaxFreeQueueOption = _DEFAULT_QUEUE.max_free_queue,
    perturbation: PerturbationOption = None,
    cheat_with: CheatWithOption = None,
    cheat_fraction: CheatFractionOption = None,
    target_client: TargetClientOption = None,
    wrong_model: WrongModelOption = None,
    wrong_quant: WrongQuantOption = None,
    seed: SeedOption = None,
) -> None:
    """Run a node that misbehaves as ADVERSARY (same options as `corolla node run`)."""
    options = AdversaryOptions(
        perturbation=perturbation,
        cheat_with=cheat_with,
        cheat_fraction=cheat_fraction,
        target_client=target_client,
        wrong_model=wrong_model,
        wrong_quant=wrong_quant,
        seed=seed,
    )
    behaviour = make_behaviour(adversary, options)
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
        ledger=ledger,
        ledger_key=ledger_key,
        max_queue=max_queue,
        max_free_queue=max_free_queue,
    )
    typer.echo(f"simulated adversary: {behaviour.describe()}")
    run_node(config, behaviour)


def register_simulate(app: typer.Typer) -> None:
    """Add the ``simulate`` sub-app (with ``simulate node``) to the root command."""
    app.add_typer(simulate_app, name="simulate")
