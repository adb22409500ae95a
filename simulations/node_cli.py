"""``corolla simulate node --adversary NAME``: a node that misbehaves on purpose.

Same options as ``corolla node run`` plus ``--adversary`` and the strategies' settings (see
:mod:`corolla.simulations.adversaries`). For tests, simulations and demos only: the production
``corolla node run`` has no way to switch misbehaviour on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corolla.node.run_cli import with_node_options
from corolla.node.server import NodeConfig, run_node
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


@simulate_app.command("node")
@with_node_options
def node(
    config: NodeConfig,
    adversary: AdversaryOption,
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
    typer.echo(f"simulated adversary: {behaviour.describe()}")
    run_node(config, behaviour)


def register_simulate(app: typer.Typer) -> None:
    """Add the ``simulate`` sub-app (with ``simulate node``) to the root command."""
    app.add_typer(simulate_app, name="simulate")
