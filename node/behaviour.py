"""What a node does with a step: the :class:`Behaviour` seam (honest here), and the benchmark's
unsigned stand-in signer.

:class:`~corolla.node.service.NodeService` computes every step through a behaviour;
:mod:`corolla.simulations.adversaries` supplies dishonest ones for tests and simulations (the
production ``corolla node run`` always runs the honest one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from corolla.node.model.span import BetweenBlocks, Span, SpanCache
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, make_receipt

__all__ = ["BENCHMARK_UNSIGNED_ENV", "Behaviour", "unsigned_signer"]

BENCHMARK_UNSIGNED_ENV = "COROLLA_BENCHMARK_UNSIGNED"
"""Set to 1 by benchmarks/swarm_generation.py only: the node checks no client signature and signs
receipts with zeros (the same variable switches the client's counterpart in
:mod:`corolla.client.session`). Every normal client rejects such a node."""


class Behaviour:
    """How a node computes a step and what it replies. This one is honest.

    Per step the service calls, on its compute thread: ``compute`` (the forward pass, which
    advances the session's cache), ``output`` (the tensor the receipt names), ``sign_receipt``,
    then ``sent`` (the tensor actually sent back).
    """

    name = "honest"

    def describe(self) -> str:
        """One line saying what this behaviour does (printed by a simulated node)."""
        return self.name

    def attach(self, span: Span) -> None:
        """Called once with the node's whole span before it serves (load what you need)."""

    def compute(
        self,
        request: StepRequest,
        span: Span,
        hidden: torch.Tensor,
        cache: SpanCache | None,
        between: BetweenBlocks | None = None,
    ) -> torch.Tensor:
        """The forward pass of ``span`` (the session's blocks) over ``hidden``, with ``cache``;
        ``between`` is called after each block (see `Span.forward`)."""
        return span.forward(hidden, cache, between)

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        """The output the node claims (its receipt names this tensor's digest); ``honest`` is
        what ``compute`` returned."""
        return honest

    def sign_receipt(
        self, identity: Identity, request: StepRequest, output_digest: bytes, previous: bytes
    ) -> Receipt:
        """The receipt for ``request``, signed with the node's key."""
        return make_receipt(identity, request, output_digest, previous)

    def sent(self, step: int, request: StepRequest, output: torch.Tensor) -> torch.Tensor:
        """The tensor actually sent back."""
        return output


@dataclass(frozen=True)
class _NoSignatures:
    """The benchmark's stand-in signer: the node's public key, an all-zero signature."""

    public_key: bytes

    def sign(self, message: bytes) -> bytes:
        return bytes(64)


def unsigned_signer(identity: Identity) -> Identity:
    """A stand-in for ``identity`` whose signatures are 64 zero bytes (benchmarks only)."""
    return cast(Identity, _NoSignatures(identity.public_key))
