"""The ledger's randomness beacon: one unpredictable, publicly checkable value per epoch.

Who verifies a node's work must be drawn by randomness that neither the client nor the node can
bias and that anyone can recompute afterwards. The ledger signs, with its Ed25519 key, the
canonical message ``("ledger-beacon", origin, period, epoch)`` for every epoch of ``period``
seconds, and serves a :class:`Beacon` only once its epoch has begun; the beacon's value is a
digest of that signature. Ed25519 signatures are deterministic (RFC 8032): nobody without the
ledger's key can predict an epoch's value before the ledger reveals it, and everyone can check a
revealed value against the ledger's public key.

What the ledger itself could do: a signer that does not follow RFC 8032 can make several valid
signatures of one message and reveal the one it likes. The ledger operator is trusted for this
(as it is for its referee); a verifiable random function would remove that trust, and libsodium
as shipped with PyNaCl has none. ``docs/verification.md`` states the consequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corolla.errors import BadSignature, InvalidInput
from corolla.verify.encoding import INT_MAX, domain_digest, domain_message, from_lower_hex
from corolla.verify.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    peer_name_of,
    verify_signature,
)

__all__ = [
    "MAX_PERIOD_S",
    "Beacon",
    "epoch_of",
    "epoch_start",
    "sign_beacon",
    "verify_beacon",
]

MAX_PERIOD_S = 24 * 3600
_ORIGIN_LENGTH = 256
_FIELDS = ("origin", "period", "epoch", "ledger_key", "signature")


@dataclass(frozen=True, slots=True)
class Beacon:
    """The ledger's signed beacon for ``epoch`` (epochs are ``period`` seconds long)."""

    origin: str
    period: int
    epoch: int
    ledger_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not 0 < len(self.origin) <= _ORIGIN_LENGTH:
            raise InvalidInput(f"a beacon's origin must be 1..{_ORIGIN_LENGTH} characters")
        if _bad_int(self.period, 1, MAX_PERIOD_S):
            raise InvalidInput(f"a beacon's period must be 1..{MAX_PERIOD_S} seconds")
        if _bad_int(self.epoch, 0, INT_MAX):
            raise InvalidInput("a beacon's epoch must be a non-negative 64-bit int")
        for name, size in (("ledger_key", PUBLIC_KEY_SIZE), ("signature", SIGNATURE_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise InvalidInput(f"a beacon's {name} must be {size} bytes")

    def signing_bytes(self) -> bytes:
        return domain_message(
            "ledger-beacon", self.origin, self.period, self.epoch, self.ledger_key
        )

    @property
    def value(self) -> bytes:
        """The epoch's 32 random bytes: a digest of the ledger's signature."""
        return domain_digest("ledger-beacon-value", self.signature)

    @property
    def starts_at(self) -> int:
        """When the epoch begins (seconds since the Unix epoch)."""
        return epoch_start(self.epoch, self.period)

    def to_value(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (bytes as lowercase hex)."""
        return {
            name: value.hex() if isinstance(value, bytes) else value
            for name, value in self.to_value().items()
        }

    @classmethod
    def from_value(cls, value: Any) -> Beacon:
        """Parse :meth:`to_value` output; raises :class:`InvalidInput`."""
        if not isinstance(value, Mapping) or set(value) != set(_FIELDS):
            raise InvalidInput(f"a beacon has exactly the fields {list(_FIELDS)}")
        return cls(**{name: value[name] for name in _FIELDS})

    @classmethod
    def from_dict(cls, data: Any) -> Beacon:
        """Parse :meth:`to_dict` output; raises :class:`InvalidInput`."""
        if not isinstance(data, Mapping) or set(data) != set(_FIELDS):
            raise InvalidInput(f"a beacon has exactly the fields {list(_FIELDS)}")
        values = dict(data)
        for name in ("ledger_key", "signature"):
            values[name] = from_lower_hex(values[name], f"a beacon's {name}")
        return cls.from_value(values)


def epoch_of(time_s: float, period: int) -> int:
    """The epoch that ``time_s`` (seconds since the Unix epoch) falls in."""
    if _bad_int(period, 1, MAX_PERIOD_S):
        raise InvalidInput(f"a beacon's period must be 1..{MAX_PERIOD_S} seconds")
    return int(time_s // period)


def epoch_start(epoch: int, period: int) -> int:
    return epoch * period


def sign_beacon(identity: Identity, origin: str, period: int, epoch: int) -> Beacon:
    """The ledger's beacon for ``epoch`` (only the ledger holds ``identity``)."""
    unsigned = Beacon(origin, period, epoch, identity.public_key, bytes(SIGNATURE_SIZE))
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))


def verify_beacon(beacon: Beacon, ledger_key: bytes, origin: str | None = None) -> None:
    """Check that ``beacon`` was signed by ``ledger_key`` (and names ``origin``, if given);
    raises :class:`BadSignature`."""
    if beacon.ledger_key != ledger_key:
        raise BadSignature(
            f"the beacon was signed by {peer_name_of(beacon.ledger_key)}, not by the ledger "
            f"{peer_name_of(ledger_key)}"
        )
    if origin is not None and beacon.origin != origin:
        raise BadSignature(f"the beacon is of ledger {beacon.origin!r}, not {origin!r}")
    verify_signature(ledger_key, beacon.signing_bytes(), beacon.signature)


def _bad_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
