"""Wire forms of checks v2 that both ends of the ledger's API share: serving declarations,
published calibrations (floats travel as text: the canonical encoding a signature covers has no
floats) and the ledger's answer to a dispute.

- A **serving declaration** (``POST /v1/serving``, signed by the node) says the node serves
  blocks ``[start, end)`` of the model with ``model_digest`` under compute ``profile``:
  ``{"model": HEX32, "start": INT, "end": INT, "profile": TEXT}``.
- A **calibration** (``POST /v1/calibrations``, signed by the ledger operator) is a
  :class:`~corolla.verify.tolerance.Calibration` with every float as its ``repr`` text.

:mod:`corolla.verify.tolerance` imports torch, which the ledger's server otherwise never loads:
it is imported here only when a profile or a calibration is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corolla.errors import InvalidInput
from corolla.ledger.api.models import from_hex
from corolla.verify.receipts import MAX_BLOCK
from corolla.verify.verdicts import parse_score

if TYPE_CHECKING:
    from corolla.verify.tolerance import Calibration

__all__ = [
    "CALIBRATION_FLOATS",
    "DisputeOutcome",
    "Serving",
    "calibration_from_wire",
    "calibration_to_wire",
    "default_threshold",
]

CALIBRATION_FLOATS = ("honest_max", "honest_p999", "threshold_margin", "floor_margin")
_SERVING_FIELDS = frozenset({"model", "start", "end", "profile"})


@dataclass(frozen=True, slots=True)
class Serving:
    """What a node declares it serves: blocks ``[start, end)`` of a model, under a profile."""

    model_digest: bytes
    start: int
    end: int
    profile: str

    def __post_init__(self) -> None:
        if not isinstance(self.model_digest, bytes) or len(self.model_digest) != 32:
            raise InvalidInput("a serving declaration's model digest is 32 bytes")
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(f"a serving declaration's {name} is an integer")
        if not 0 <= self.start < self.end <= MAX_BLOCK:
            raise InvalidInput(
                f"a serving declaration's blocks [{self.start}, {self.end}) must be a non-empty "
                f"range within [0, {MAX_BLOCK}]"
            )
        if not isinstance(self.profile, str):
            raise InvalidInput("a serving declaration's profile is a name (fp32, int8, nf4)")
        default_threshold(self.profile)

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end

    def to_body(self) -> dict[str, Any]:
        """The signed body of a declaration or a withdrawal."""
        return {
            "model": self.model_digest.hex(),
            "start": self.start,
            "end": self.end,
            "profile": self.profile,
        }

    @classmethod
    def from_body(cls, body: Any) -> Serving:
        """Parse :meth:`to_body` output; raises :class:`InvalidInput`."""
        if not isinstance(body, Mapping) or set(body) != _SERVING_FIELDS:
            raise InvalidInput(f"a serving declaration has exactly {sorted(_SERVING_FIELDS)}")
        model = from_hex(body["model"])
        return cls(model, body["start"], body["end"], body["profile"])


def default_threshold(profile: str) -> float:
    """The profile's default threshold; raises :class:`InvalidInput` for an unknown profile."""
    from corolla.verify.tolerance import tolerance_for

    return tolerance_for(profile).threshold


def calibration_to_wire(calibration: Calibration) -> dict[str, Any]:
    """A calibration as JSON without floats (each as its ``repr`` text)."""
    data = calibration.to_dict()
    for name in CALIBRATION_FLOATS:
        data[name] = repr(float(data[name]))
    return data


def calibration_from_wire(data: Any) -> Calibration:
    """Parse :func:`calibration_to_wire` output; raises :class:`InvalidInput`."""
    from corolla.verify.tolerance import Calibration

    if not isinstance(data, Mapping):
        raise InvalidInput("a calibration is a JSON object")
    values = dict(data)
    for name in CALIBRATION_FLOATS:
        if name not in values:
            raise InvalidInput(f"a calibration has a {name}")
        number = parse_score(values[name], name)
        if not math.isfinite(number):
            raise InvalidInput(f"a calibration's {name} is finite")
        values[name] = number
    return Calibration.from_dict(values)


@dataclass(frozen=True, slots=True)
class DisputeOutcome:
    """The ledger's answer to a dispute (a refusal raises ``LedgerRefused`` instead)."""

    judged: bool
    """Whether a referee decided it (else it was logged unjudged and slashed nobody)."""
    node_lied: bool
    lying_verifiers: tuple[bytes, ...]
    """Keys of the verifiers the referee convicted (slashed)."""
    judge: str
    """``referee`` or ``none``."""
    reason: str
    accused: bytes
    dispute_digest: bytes
    credited_units: int
    """Block-tokens of the node's claims credited because the referee found them honest."""
    entries: tuple[int, ...]

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> DisputeOutcome:
        """Read the ledger's JSON answer; raises :class:`InvalidInput` if it is malformed."""
        try:
            return cls(
                judged=bool(answer["judged"]),
                node_lied=bool(answer["node_lied"]),
                lying_verifiers=tuple(from_hex(key) for key in answer["lying_verifiers"]),
                judge=str(answer["judge"]),
                reason=str(answer["reason"]),
                accused=from_hex(answer["accused"]),
                dispute_digest=from_hex(answer["dispute_digest"]),
                credited_units=int(answer["credited_units"]),
                entries=tuple(int(seq) for seq in answer["entries"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInput(f"a malformed answer to a dispute: {error}") from None
