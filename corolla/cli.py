"""The ``corolla`` command: sub-apps assembled from the packages, and one error boundary.

Any :class:`~corolla.errors.CorollaError` that reaches the top becomes a one-line message on
stderr and exit code 2; a user's mistake never prints a traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from corolla.errors import CorollaError
from corolla.version import __version__

__all__ = ["app", "main"]

app = typer.Typer(
    name="corolla",
    help="Decentralized LLM inference with signed activations and Bloom points.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"corolla {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Decentralized LLM inference with signed activations and Bloom points."""


def _register() -> None:
    from corolla.client.cli import register as register_client
    from corolla.ledger.cli import register as register_ledger
    from corolla.node.cli import register as register_node

    register_node(app)
    register_client(app)
    from corolla.ledger_server import load_referee

    register_ledger(app, referee_factory=load_referee)

    from corolla.simulations.node_cli import register_simulate

    register_simulate(app)

    from corolla.demo import register as register_demo

    register_demo(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Run the command line; turn every expected error into one line and a non-zero exit."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        code = app(args=argv, standalone_mode=False)
    except CorollaError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if isinstance(code, int) and code:
        if code == 130:
            click.echo("interrupted", err=True)
        sys.exit(code)
