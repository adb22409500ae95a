"""A verifier's signed verdict on a node's work: the comparison, signed by whoever compared.

A verifier recomputes node N's steps ``[first_step, end_step)`` of session S on the span and
compares its outputs with the outputs N signed (bound by ``node_chain``, N's chain digest after
the last compared step, which pins every output N claimed in that session). It signs the score,
the threshold it applied for the compute profile and the verdict, with the beacon epoch that
assigned it and the digest of its own receipt for the recomputation. A client's word alone
credits nothing: the ledger counts a check only from its signed verdict, and refuses a verdict
whose ``passed`` disagrees with its ``score`` and the profile's threshold
(:func:`consistent`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corolla.errors import BadReceipt, InvalidInput
from corolla.verify.encoding import INT_MAX, domain_digest, domain_message, from_lower_hex
from corolla.verify.identity import (
    SIGNATURE_SIZE,
    Identity,
    peer_name_of,
    verify_signature,
)

__all__ = ["CheckVerdict", "consistent", "parse_score", "sign_verdict", "verify_verdict"]

_SCORE = re.compile(r"(?:inf|nan|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)")
_MAX_SCORE_TEXT = 32
_KEYS = ("verifier_key", "client_key", "node_key")
_DIGESTS = ("model_digest", "span_digest", "node_chain", "recomputation_digest")
_INTS = (
    "start",
    "end",
    "first_step",
    "end_step",
    "first_position",
    "end_position",
    "beacon_epoch",
    "recomputed_positions",
)
_TEXTS = ("profile", "score", "threshold")
_FIELDS = (*_KEYS, *_DIGESTS, "session_id", *_INTS, *_TEXTS, "passed", "signature")


@dataclass(frozen=True, slots=True)
class CheckVerdict:
    """``verifier_key`` compared node ``node_key``'s steps ``[first_step, end_step)`` (token
    positions ``[first_position, end_position)``) of session ``session_id`` on blocks
    ``[start, end)`` with its own recomputation, for client ``client_key``."""

    verifier_key: bytes
    client_key: bytes
    node_key: bytes
    model_digest: bytes
    span_digest: bytes
    node_chain: bytes
    recomputation_digest: bytes
    session_id: bytes
    start: int
    end: int
    first_step: int
    end_step: int
    first_position: int
    end_position: int
    beacon_epoch: int
    recomputed_positions: int
    """Token positions the verifier newly computed for this verdict (what its fee pays for)."""
    profile: str
    score: str
    threshold: str
    passed: bool
    signature: bytes

    def __post_init__(self) -> None:
        for name in (*_KEYS, *_DIGESTS):
            _check_bytes(name, getattr(self, name), 32)
        _check_bytes("session_id", self.session_id, 16)
        _check_bytes("signature", self.signature, SIGNATURE_SIZE)
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT_MAX:
                raise InvalidInput(f"a verdict's {name} must be a non-negative 64-bit int")
        if self.start >= self.end:
            raise InvalidInput(f"a verdict's span [{self.start}, {self.end}) holds no blocks")
        if self.first_step >= self.end_step or self.first_position >= self.end_position:
            raise InvalidInput("a verdict compares at least one step and one position")
        if self.recomputed_positions > self.end_position:
            raise InvalidInput("a verdict cannot recompute more positions than it covers")
        if not isinstance(self.profile, str) or not 0 < len(self.profile) <= 16:
            raise InvalidInput("a verdict's profile is a short name (fp32, int8, nf4)")
        for name in ("score", "threshold"):
            parse_score(getattr(self, name), name)
        if not isinstance(self.passed, bool):
            raise InvalidInput("a verdict's passed is true or false")
        if self.verifier_key in (self.node_key, self.client_key):
            raise InvalidInput("a verifier cannot judge its own work or its own request")

    def signing_bytes(self) -> bytes:
        fields = self.to_value()
        del fields["signature"]
        return domain_message("check-verdict", fields)

    def digest(self) -> bytes:
        """The verdict's identity."""
        return domain_digest("signed-check-verdict", self.signing_bytes(), self.signature)

    def to_value(self) -> dict[str, Any]:
        """Canonical-encodable dict (bytes stay bytes)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (bytes as lowercase hex)."""
        return {
            name: value.hex() if isinstance(value, bytes) else value
            for name, value in self.to_value().items()
        }

    @classmethod
    def from_value(cls, value: Any) -> CheckVerdict:
        """Parse :meth:`to_value` output; raises :class:`InvalidInput`."""
        if not isinstance(value, Mapping) or set(value) != set(_FIELDS):
            raise InvalidInput(f"a verdict has exactly the fields {sorted(_FIELDS)}")
        return cls(**{name: value[name] for name in _FIELDS})

    @classmethod
    def from_dict(cls, data: Any) -> CheckVerdict:
        """Parse :meth:`to_dict` output; raises :class:`InvalidInput`."""
        if not isinstance(data, Mapping) or set(data) != set(_FIELDS):
            raise InvalidInput(f"a verdict has exactly the fields {sorted(_FIELDS)}")
        values = dict(data)
        for name in (*_KEYS, *_DIGESTS, "session_id", "signature"):
            values[name] = from_lower_hex(values[name], f"a verdict's {name}")
        return cls.from_value(values)


def parse_score(text: Any, name: str = "score") -> float:
    """A score or threshold as the text a verdict carries (``repr`` of a float, ``inf``,
    ``nan``); raises :class:`InvalidInput`."""
    if not isinstance(text, str) or len(text) > _MAX_SCORE_TEXT or not _SCORE.fullmatch(text):
        raise InvalidInput(f"a verdict's {name} is a decimal number as text (e.g. '3.2e-06')")
    return float(text)


def consistent(verdict: CheckVerdict, threshold: float) -> bool:
    """Whether the verdict follows from its own score under ``threshold`` (the one the profile
    has for this model): it must name that threshold, and pass exactly when the score is finite
    and at most the threshold."""
    named = parse_score(verdict.threshold, "threshold")
    if not math.isclose(named, threshold, rel_tol=1e-9, abs_tol=0.0):
        return False
    score = parse_score(verdict.score)
    return verdict.passed == (math.isfinite(score) and score <= threshold)


def sign_verdict(identity: Identity, unsigned: CheckVerdict) -> CheckVerdict:
    """``unsigned`` (any signature bytes) signed by the verifier ``identity``."""
    if unsigned.verifier_key != identity.public_key:
        raise InvalidInput("a verdict is signed by the verifier it names")
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))


def verify_verdict(verdict: CheckVerdict) -> None:
    """Check the verifier's signature; raises :class:`BadReceipt` naming the verifier."""
    try:
        verify_signature(verdict.verifier_key, verdict.signing_bytes(), verdict.signature)
    except Exception as error:  # BadSignature, with the verifier named
        raise BadReceipt(
            f"verifier {peer_name_of(verdict.verifier_key)}'s verdict is not signed by it: {error}"
        ) from None


def _check_bytes(name: str, value: Any, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidInput(f"a verdict's {name} must be {size} bytes")
