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

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corolla.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported where tensors are compared: the ledger reads
    import torch  # thresholds and calibrations without loading it

__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_FLOOR_RATIO",
    "PROFILES",
    "TOLERANCES",
    "Calibration",
    "Comparison",
    "Tolerance",
    "compare",
    "load_calibrations",
    "profile_of",
    "save_calibrations",
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
    import torch

    a = claimed.detach().to(torch.float64)
    b = recomputed.detach().to(torch.float64)
    difference = torch.linalg.vector_norm(a - b, dim=-1)
    scale = torch.maximum(torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(b, dim=-1))
    return torch.where(scale > 0, difference / scale.clamp_min(torch.finfo(torch.float64).tiny), 0)


def compare(
    claimed: torch.Tensor,
    recomputed: torch.Tensor,
    profile: str,
    threshold: float | None = None,
) -> Comparison:
    """Compare a node's claimed output with a verifier's recomputation under `profile`, with
    the profile's default threshold or ``threshold`` (a model's calibrated one).

    claimed, recomputed: the same shape [..., hidden] (e.g. [batch, tokens, hidden]) and the
    profile's dtype. Raises InvalidInput on a mismatch, an empty tensor, or a non-finite
    recomputation (the verifier's own result cannot judge anyone). A non-finite claimed output
    is a failed comparison with score inf, never an error.
    """
    import torch

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
    limit = tolerance.threshold if threshold is None else _positive("threshold", threshold)
    return Comparison(
        profile=tolerance.profile,
        passed=score <= limit,
        score=score,
        threshold=limit,
        token_scores=tuple(errors.tolist()),
        worst_token=worst,
    )


def _check_pair(claimed: torch.Tensor, recomputed: torch.Tensor, tolerance: Tolerance) -> None:
    import torch

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


DEFAULT_FLOOR_RATIO = 10.0
"""An uncalibrated model's honest floor is its profile's default threshold divided by this (the
defaults were set at least 10x above the largest honest score measured)."""

CALIBRATION_FILE = "corolla-tolerance.json"
"""Where a checkpoint's measured tolerances live, beside its manifest."""
_CALIBRATION_FORMAT = "corolla-tolerance/1"


@dataclass(frozen=True)
class Calibration:
    """One model's measured honest divergence under one profile, and the rules set from it.

    ``threshold`` (a check fails above it) is ``honest_max x threshold_margin``; the *honest
    floor* (``honest_max x floor_margin``) is the score under which a recomputation that picks
    another token is still taken as honest rounding (the head rule)."""

    model_digest: bytes
    profile: str
    checked_steps: int
    honest_max: float
    honest_p999: float
    threshold_margin: float
    floor_margin: float
    command: str
    """The command that measured it (so anyone can measure it again)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_digest, bytes) or len(self.model_digest) != 32:
            raise InvalidInput("a calibration's model digest is 32 bytes")
        tolerance_for(self.profile)
        if isinstance(self.checked_steps, bool) or not isinstance(self.checked_steps, int):
            raise InvalidInput("a calibration's checked_steps is an integer")
        if self.checked_steps < 1:
            raise InvalidInput("a calibration measured at least one checked step")
        for name in ("honest_max", "honest_p999"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"a calibration's {name} is a number")
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"a calibration's {name} is a finite number >= 0")
        for name in ("threshold_margin", "floor_margin"):
            _positive(name, getattr(self, name))
        if not 1 <= self.floor_margin <= self.threshold_margin:
            raise InvalidInput("a calibration's floor margin is between 1 and its threshold margin")
        if not isinstance(self.command, str) or len(self.command) > 1000:
            raise InvalidInput("a calibration's command is text of at most 1000 characters")

    @property
    def threshold(self) -> float:
        return max(self.honest_max, _SMALLEST) * self.threshold_margin

    @property
    def honest_floor(self) -> float:
        return max(self.honest_max, _SMALLEST) * self.floor_margin

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_digest"] = self.model_digest.hex()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        names = set(cls.__dataclass_fields__)
        if not isinstance(data, Mapping) or set(data) != names:
            raise InvalidInput(f"a calibration has exactly the fields {sorted(names)}")
        digest = data["model_digest"]
        if not isinstance(digest, str) or len(digest) != 64:
            raise InvalidInput("a calibration's model digest is 64 hex digits")
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raise InvalidInput("a calibration's model digest is not hex") from None
        return cls(**{**data, "model_digest": raw})


_SMALLEST = 1e-9
"""A floor for calibrations that measured only bit-identical recomputations."""


def load_calibrations(path: Path, model_digest: bytes | None = None) -> dict[str, Calibration]:
    """The calibrations in ``path`` (a ``corolla-tolerance.json``), by profile; with
    ``model_digest``, refuse a file measured on another model. Raises :class:`InvalidInput`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such calibration file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InvalidInput(f"{path}: not a calibration file ({error})") from None
    if not isinstance(data, dict) or data.get("format") != _CALIBRATION_FORMAT:
        raise InvalidInput(f"{path}: not a {_CALIBRATION_FORMAT} file")
    items = data.get("calibrations")
    if not isinstance(items, list) or not items:
        raise InvalidInput(f'{path}: "calibrations" must be a non-empty list')
    found: dict[str, Calibration] = {}
    for item in items:
        calibration = Calibration.from_dict(item)
        if calibration.profile in found:
            raise InvalidInput(f"{path}: profile {calibration.profile} is calibrated twice")
        if model_digest is not None and calibration.model_digest != model_digest:
            raise InvalidInput(f"{path}: measured on another model ({item['model_digest'][:16]})")
        found[calibration.profile] = calibration
    return found


def save_calibrations(path: Path, calibrations: list[Calibration]) -> None:
    """Write ``calibrations`` to ``path`` atomically (a reader never sees half a file)."""
    body = {
        "format": _CALIBRATION_FORMAT,
        "calibrations": [c.to_dict() for c in calibrations],
    }
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(body, out, indent=2, sort_keys=True)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"a {name} is a number")
    if not (math.isfinite(value) and value > 0):
        raise InvalidInput(f"a {name} is a finite number > 0")
    return float(value)
