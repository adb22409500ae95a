"""Unsigned nodes and clients, for the benchmarks that measure what signatures cost.

    python benchmarks/unsigned.py node run --model DIR --blocks 0:4 [any `corolla node run` option]

runs a node in this process through the node server's entry (``run_node``) with a config that
says ``benchmark_unsigned=True`` (it checks no client signature) and a behaviour that signs every
receipt with 64 zero bytes. Its options are exactly those of ``corolla node run``. Every normal
client rejects such a node; :func:`unsigned_client` builds the only kind that uses it
(``ClientConfig.verify_receipts=False`` and a signer of zeros). Nothing in the product can start
either: no environment variable, no option of the ``corolla`` command.

A launcher starts such a node by running :data:`UNSIGNED_NODE_PROGRAM` with the usual
``node run ...`` arguments, instead of the ``corolla`` command.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import typer

from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.errors import CorollaError
from corolla.node.behaviour import Behaviour
from corolla.node.run_cli import NodeOptions, options_command
from corolla.node.server import run_node
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, make_receipt

__all__ = [
    "UNSIGNED_NODE_PROGRAM",
    "UnsignedBehaviour",
    "ZeroSigner",
    "serve_unsigned",
    "unsigned_client",
]

UNSIGNED_NODE_PROGRAM: tuple[str, ...] = (sys.executable, str(Path(__file__).resolve()))
"""The command line that starts this script; append ``node run ...`` options."""


@dataclass(frozen=True)
class ZeroSigner:
    """A stand-in signer: a real public key, and 64 zero bytes for every signature."""

    public_key: bytes

    def sign(self, message: bytes) -> bytes:
        return bytes(64)


class UnsignedBehaviour(Behaviour):
    """Computes honestly and signs every receipt with zeros (under the node's real key)."""

    name = "unsigned"

    def sign_receipt(
        self, identity: Identity, request: StepRequest, output_digest: bytes, previous: bytes
    ) -> Receipt:
        signer = cast(Identity, ZeroSigner(identity.public_key))
        return make_receipt(signer, request, output_digest, previous)


def serve_unsigned(options: NodeOptions) -> None:
    """Serve blocks with no signatures: checks none, signs receipts with zeros (benchmarks)."""
    config = options.config()
    service = dataclasses.replace(config.service, benchmark_unsigned=True)
    run_node(dataclasses.replace(config, service=service), UnsignedBehaviour())


def unsigned_client(
    model_dir: Path, initial_peers: Sequence[str], identity: Path
) -> DistributedModelForCausalLM:
    """A client that signs its requests with zeros and checks no receipt (spot-checks off)."""
    config = ClientConfig(
        initial_peers=tuple(initial_peers), identity=identity, verify_receipts=False
    )
    signer = ZeroSigner(Identity.generate().public_key)
    return DistributedModelForCausalLM.from_pretrained(
        model_dir, config=config, checks=None, signer=signer
    )


app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
node_app = typer.Typer(help="A node that signs nothing.", no_args_is_help=True)
node_app.command("run")(options_command(NodeOptions, serve_unsigned))
app.add_typer(node_app, name="node")


def main() -> None:
    try:
        app()
    except CorollaError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
