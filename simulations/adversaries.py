"""Dishonest node behaviours: what a malicious node does instead of its honest computation.

Each strategy is a :class:`~corolla.node.service.Behaviour` the node service computes through.
The honest output is always computed first (the cache advances as it should), then changed:

- ``wrong-key``   signs receipts with a key other than the one it announced;
- ``bad-digest``  returns an output different from the one its (validly signed) receipt names;
- ``noise``       adds Gaussian noise to its output and signs that consistently;
- ``lazy``        echoes its input instead of running the blocks, and signs that consistently.

The first two are caught by receipt checks alone; the last two need spot-checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from corolla.errors import InvalidInput
from corolla.node.service import Behaviour
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, make_receipt

__all__ = ["ADVERSARIES", "BadDigest", "Lazy", "Noise", "WrongKey", "make_behaviour"]


class WrongKey(Behaviour):
    """Signs every receipt with a fresh key, not the announced one."""

    name = "wrong-key"

    def __init__(self) -> None:
        self.other = Identity.generate()

    def sign_receipt(
        self, identity: Identity, request: StepRequest, output_digest: bytes, previous: bytes
    ) -> Receipt:
        return make_receipt(self.other, request, output_digest, previous)


def _noise_like(tensor: torch.Tensor, step: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1_000_003 * step + 17)
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    return (noise * scale).to(tensor.dtype)


class BadDigest(Behaviour):
    """Signs the honest output's digest but sends a slightly different tensor."""

    name = "bad-digest"

    def __init__(self, scale: float = 1e-3) -> None:
        self.scale = scale

    def sent(self, step: int, request: StepRequest, output: torch.Tensor) -> torch.Tensor:
        return output + _noise_like(output, step, self.scale)


class Noise(Behaviour):
    """Adds noise of ``scale`` times the output's standard deviation; the receipt matches it."""

    name = "noise"

    def __init__(self, scale: float = 0.5) -> None:
        self.scale = scale

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        spread = float(honest.float().std()) if honest.numel() > 1 else 1.0
        return honest + _noise_like(honest, step, self.scale * spread)


class Lazy(Behaviour):
    """Skips its blocks: returns the input hidden states as its output."""

    name = "lazy"

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        return hidden_in.clone()


ADVERSARIES: dict[str, Callable[[], Behaviour]] = {
    WrongKey.name: WrongKey,
    BadDigest.name: BadDigest,
    Noise.name: Noise,
    Lazy.name: Lazy,
}


def make_behaviour(name: str) -> Behaviour:
    """The behaviour called ``name``; ``honest`` gives the honest one."""
    if name == Behaviour.name:
        return Behaviour()
    factory = ADVERSARIES.get(name)
    if factory is None:
        choices = ", ".join([Behaviour.name, *ADVERSARIES])
        raise InvalidInput(f"unknown adversary {name!r}; choose one of: {choices}")
    return factory()
