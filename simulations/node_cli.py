"""``corolla simulate node --adversary NAME``: a node that misbehaves on purpose.

Same options as ``corolla node run`` (:class:`SimulatedNodeOptions` extends
:class:`~corolla.node.run_cli.NodeOptions`) plus ``--adversary`` and the strategies' settings
(see :mod:`corolla.simulations.adversaries`). For tests, simulations and demos only: the
production ``corolla node run`` has no way to switch misbehaviour on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from corolla.node.run_cli import NodeOptions, options_command
from corolla.node.server import run_node
from corolla.simulations.adversaries import ADVERSARIES, AdversaryOptions, make_behaviour

__all__ = ["SimulatedNodeOptions", "node", "register_simulate", "simulate_app"]

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
AccompliceOption = Annotated[
    str | None,
    typer.Option("--accomplice", help="colluding-verifier: public key (hex) it covers for."),
]
TargetNodeOption = Annotated[
    str | None,
    typer.Option("--target-node", help="lying-verifier: lie only against this node (hex key)."),
]
SteerTokenOption = Annotated[
    int | None, typer.Option("--steer-token", help="steering: the token id it steers towards.")
]
SeedOption = Annotated[
    int | None, typer.Option("--seed", help="Seed of the adversary's random choices (default 0).")
]


@dataclass(frozen=True, kw_only=True)
class SimulatedNodeOptions(NodeOptions):
    """The options of ``corolla simulate node``: a node's, and what its adversary does."""

    adversary: AdversaryOption
    perturbation: PerturbationOption = None
    cheat_with: CheatWithOption = None
    cheat_fraction: CheatFractionOption = None
    target_client: TargetClientOption = None
    wrong_model: WrongModelOption = None
    wrong_quant: WrongQuantOption = None
    seed: SeedOption = None
    accomplice: AccompliceOption = None
    target_node: TargetNodeOption = None
    steer_token: SteerTokenOption = None

    def adversary_options(self) -> AdversaryOptions:
        return AdversaryOptions(
            perturbation=self.perturbation,
            cheat_with=self.cheat_with,
            cheat_fraction=self.cheat_fraction,
            target_client=self.target_client,
            wrong_model=self.wrong_model,
            wrong_quant=self.wrong_quant,
            seed=self.seed,
            accomplice=self.accomplice,
            target_node=self.target_node,
            steer_token=self.steer_token,
        )


def serve_misbehaving(options: SimulatedNodeOptions) -> None:
    """Run a node that misbehaves as ADVERSARY (same options as `corolla node run`)."""
    config = options.config()
    adversary = options.adversary_options()
    if options.adversary == "steering":  # it steers with its own model's head
        adversary = dataclasses.replace(adversary, steer_model=Path(config.model))
    behaviour = make_behaviour(options.adversary, adversary)
    typer.echo(f"simulated adversary: {behaviour.describe()}")
    run_node(config, behaviour)


node = options_command(SimulatedNodeOptions, serve_misbehaving)
simulate_app.command("node")(node)


def register_simulate(app: typer.Typer) -> None:
    """Add the ``simulate`` sub-app (with ``simulate node``) to the root command."""
    app.add_typer(simulate_app, name="simulate")
