"""How close a node's claimed activations must be to an honest recomputation, per compute profile.

A spot-check recomputes a session's prefix on a second peer in one forward call and compares
the outputs at the checked steps with what the node returned. The score is the **per-token
relative L2 error** over the hidden dimension, maximised over tokens::

    score = max over tokens t of  ||a[t] - b[t]|| / max(||a[t]||, ||b[t]||)

with a the claimed output and b the recomputed one. It is scale-invariant, symmetric (a dispute
has no privileged side), and a perturbation whose energy is a fraction eps of the token's hidden
state scores about eps, however it is spread over the hidden dimension.

The thresholds were measured with ``benchmarks/tolerance_calibration.py``: honest cached decode
against one-shot recomputation, batched and unbatched verifiers, 1 and 2 threads, both
families. On the demo-sized models (8 blocks x 256 hidden) the largest honest score of every
profile was at most 2.4e-05; each threshold is the smallest power of ten at least 10x that.
The honest floor grows with model size, so a larger checkpoint must be recalibrated
(``--model DIR``). Figures and limits: ``docs/verification.md``, "Tolerances".

Profile names map to the (dtype, quantization) a node announces, see :data:`PROFILES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from corolla.errors import InvalidInput

__all__ = [
    "PROFILES",
    "TOLERANCES",
    "Comparison",
    "Tolerance",
    "compare",
    "profile_of",
    "token_errors",
    "tolerance_for",
]


@dataclass(frozen=True)
class Tolerance:
    """The comparison rule for one compute profile."""

    profile: str
    dtype: str  # torch dtype name without "torch.", as a node announces it
    quant: str  # "none" | "int8" | "nf4", as a node announces it
    threshold: float  # a checked step passes when its score is at most this


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(profile="fp32", dtype="float32", quant="none", threshold=1e-3),
    "int8": Tolerance(profile="int8", dtype="float32", quant="int8", threshold=1e-3),
    "nf4": Tolerance(profile="nf4", dtype="float32", quant="nf4", threshold=1e-3),
}

PROFILES: dict[tuple[str, str], str] = {(t.dtype, t.quant): name for name, t in TOLERANCES.items()}
"""(dtype, quant) as announced by a node -> profile name."""


@dataclass(frozen=True)
class Comparison:
    """The verdict on one checked step (or several steps compared at once)."""

    profile: str
    passed: bool
    score: float  # max of token_scores; inf when the claimed output is not finite
    threshold: float
    token_scores: tuple[float, ...]  # one per token, in row-major order of the leading dims
    worst_token: int  # index into token_scores of the largest score

    def describe(self) -> str:
        verdict = "within" if self.passed else "exceeds"
        return (
            f"relative error {self.score:.3g} at token {self.worst_token} {verdict} the "
            f"{self.profile} tolerance of {self.threshold:.0e}"
        )


def profile_of(dtype: str, quant: str) -> str:
    """The profile name of a node announcing `dtype` ("float32") and `quant` ("none", ...)."""
    name = PROFILES.get((dtype.removeprefix("torch."), quant.lower()))
    if name is None:
        known = ", ".join(f"{d}/{q}" for d, q in PROFILES)
        raise InvalidInput(f"no tolerance for dtype {dtype!r} with quant {quant!r} ({known})")
    return name


def tolerance_for(profile: str) -> Tolerance:
    tolerance = TOLERANCES.get(profile)
    if tolerance is None:
        raise InvalidInput(
            f"unknown compute profile {profile!r} (choose from {', '.join(TOLERANCES)})"
        )
    return tolerance


def token_errors(claimed: torch.Tensor, recomputed: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric relative L2 error over the last dimension, float64 [leading dims...].

    Both tensors must be finite and of the same shape; a token where both are zero scores 0.
    """
    a = claimed.detach().to(torch.float64)
    b = recomputed.detach().to(torch.float64)
    difference = torch.linalg.vector_norm(a - b, dim=-1)
    scale = torch.maximum(torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(b, dim=-1))
    return torch.where(scale > 0, difference / scale.clamp_min(torch.finfo(torch.float64).tiny), 0)


def compare(claimed: torch.Tensor, recomputed: torch.Tensor, profile: str) -> Comparison:
    """Compare a node's claimed output with a verifier's recomputation under `profile`.

    claimed, recomputed: the same shape [..., hidden] (e.g. [batch, tokens, hidden]) and the
    profile's dtype. Raises InvalidInput on a mismatch, an empty tensor, or a non-finite
    recomputation (the verifier's own result cannot judge anyone). A non-finite claimed output
    is a failed comparison with score inf, never an error.
    """
    tolerance = tolerance_for(profile)
    _check_pair(claimed, recomputed, tolerance)
    if not bool(torch.isfinite(recomputed).all()):
        raise InvalidInput("the recomputed output holds NaN or infinite values")
    finite_tokens = torch.isfinite(claimed).all(dim=-1)  # leading dims
    safe_claimed = torch.where(torch.isfinite(claimed), claimed, recomputed)
    errors = token_errors(safe_claimed, recomputed)
    errors = torch.where(finite_tokens, errors, math.inf).flatten()
    worst = int(errors.argmax())
    score = float(errors[worst])
    return Comparison(
        profile=tolerance.profile,
        passed=score <= tolerance.threshold,
        score=score,
        threshold=tolerance.threshold,
        token_scores=tuple(errors.tolist()),
        worst_token=worst,
    )


def _check_pair(claimed: torch.Tensor, recomputed: torch.Tensor, tolerance: Tolerance) -> None:
    for name, tensor in (("claimed", claimed), ("recomputed", recomputed)):
        if not isinstance(tensor, torch.Tensor):
            raise InvalidInput(f"the {name} output must be a tensor, got {type(tensor).__name__}")
        if str(tensor.dtype).removeprefix("torch.") != tolerance.dtype:
            raise InvalidInput(
                f"the {name} output is {tensor.dtype}; profile {tolerance.profile} compares "
                f"{tolerance.dtype}"
            )
        if tensor.dim() < 1:
            raise InvalidInput(f"the {name} output has no hidden dimension (a scalar)")
        if tensor.numel() == 0:
            raise InvalidInput(f"the {name} output is empty (shape {tuple(tensor.shape)})")
    if claimed.shape != recomputed.shape:
        raise InvalidInput(
            f"claimed shape {tuple(claimed.shape)} differs from recomputed shape "
            f"{tuple(recomputed.shape)}"
        )
