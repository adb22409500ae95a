"""What a node does with a step: the :class:`Behaviour` seam, honest here.

:class:`~corolla.node.service.NodeService` computes every step through a behaviour;
:mod:`corolla.simulations.adversaries` supplies dishonest ones for tests and simulations, and
``benchmarks/unsigned.py`` one that signs receipts with zeros (the production ``corolla node
run`` always runs the honest one).
"""

from __future__ import annotations

import torch

from corolla.node.model.span import BetweenBlocks, Span, SpanCache
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, make_receipt
from corolla.verify.verdicts import CheckVerdict, sign_verdict

__all__ = ["Behaviour"]


class Behaviour:
    """How a node computes a step and what it replies. This one is honest.

    Per step the service calls, on its compute thread: ``compute`` (the forward pass, which
    advances the session's cache), ``output`` (the tensor the receipt names), ``sign_receipt``,
    then ``sent`` (the tensor actually sent back). A check step (the node as a verifier, see
    :mod:`corolla.node.verifier`) is such a step, then ``judge`` signs the verdict.
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

    def judge(self, identity: Identity, verdict: CheckVerdict) -> CheckVerdict:
        """The verdict the node signs as a verifier; ``verdict`` (unsigned) is what its own
        comparison of the checked node's claims with its recomputation gave."""
        return sign_verdict(identity, verdict)
