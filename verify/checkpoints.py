"""Signed checkpoints of a Merkle log: "log ORIGIN had SIZE entries with ROOT at TIME".

A checkpoint is what a transparency log commits to (RFC 6962's signed tree head, the
checkpoint notes of Go's sumdb): once a ledger has signed one, any later state it shows must
extend it, which :func:`corolla.verify.merkle.verify_consistency` checks. The signature is
Ed25519 over the canonical, domain-separated encoding (domain ``ledger-checkpoint``) of every
field but the signature, the signer's key included, so a checkpoint cannot be replayed under
another origin or key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corolla.errors import BadSignature, InvalidInput
from corolla.verify.encoding import INT_MAX, domain_message
from corolla.verify.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    peer_name_of,
    verify_signature,
)
from corolla.verify.merkle import HASH_SIZE

__all__ = ["MAX_ORIGIN_LENGTH", "Checkpoint", "sign_checkpoint", "verify_checkpoint"]

MAX_ORIGIN_LENGTH = 256
_DOMAIN = "ledger-checkpoint"
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_FIELDS = ("origin", "tree_size", "root_hash", "timestamp", "ledger_key", "signature")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A ledger's signed statement of its tree size and root hash at a time (ms since epoch)."""

    origin: str
    tree_size: int
    root_hash: bytes
    timestamp: int
    ledger_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not 0 < len(self.origin) <= MAX_ORIGIN_LENGTH:
            raise InvalidInput(f"checkpoint origin must be 1..{MAX_ORIGIN_LENGTH} characters")
        for name in ("tree_size", "timestamp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT_MAX:
                raise InvalidInput(f"checkpoint {name} must be a non-negative 64-bit int")
        for name, size in (
            ("root_hash", HASH_SIZE),
            ("ledger_key", PUBLIC_KEY_SIZE),
            ("signature", SIGNATURE_SIZE),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise InvalidInput(f"checkpoint {name} must be {size} bytes")

    def signing_bytes(self) -> bytes:
        """The canonical bytes the ledger signs: every field but the signature."""
        return domain_message(
            _DOMAIN, self.origin, self.tree_size, self.root_hash, self.timestamp, self.ledger_key
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; bytes as lowercase hex."""
        return {
            name: value.hex() if isinstance(value, bytes) else value
            for name, value in ((name, getattr(self, name)) for name in _FIELDS)
        }

    @classmethod
    def from_dict(cls, data: object) -> Checkpoint:
        """Parse :meth:`to_dict` output strictly; raises :class:`InvalidInput`."""
        if not isinstance(data, Mapping) or set(data) != set(_FIELDS):
            raise InvalidInput(f"a checkpoint is an object with exactly the fields {_FIELDS}")
        values: dict[str, Any] = dict(data)
        for name in ("root_hash", "ledger_key", "signature"):
            text = values[name]
            if not isinstance(text, str) or _HEX.fullmatch(text) is None:
                raise InvalidInput(f"checkpoint {name} must be lowercase hex")
            values[name] = bytes.fromhex(text)
        return cls(**values)


def sign_checkpoint(
    identity: Identity, origin: str, tree_size: int, root_hash: bytes, timestamp: int
) -> Checkpoint:
    """Sign a checkpoint as ``identity`` (the ledger)."""
    unsigned = Checkpoint(
        origin=origin,
        tree_size=tree_size,
        root_hash=root_hash,
        timestamp=timestamp,
        ledger_key=identity.public_key,
        signature=bytes(SIGNATURE_SIZE),
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))


def verify_checkpoint(
    checkpoint: Checkpoint, *, ledger_key: bytes | None = None, origin: str | None = None
) -> None:
    """Check the checkpoint's signature, and that it comes from ``ledger_key`` and ``origin``
    when those are given (pin them: a checkpoint signed by any key proves nothing).

    Raises :class:`BadSignature`."""
    if ledger_key is not None and checkpoint.ledger_key != ledger_key:
        raise BadSignature(
            f"checkpoint is signed by key {peer_name_of(checkpoint.ledger_key)}, "
            f"expected the ledger's key {peer_name_of(ledger_key)}"
        )
    if origin is not None and checkpoint.origin != origin:
        raise BadSignature(f"checkpoint is for log {checkpoint.origin!r}, expected {origin!r}")
    try:
        verify_signature(checkpoint.ledger_key, checkpoint.signing_bytes(), checkpoint.signature)
    except BadSignature:
        raise BadSignature(
            f"checkpoint of {checkpoint.origin!r} at size {checkpoint.tree_size} has a bad "
            "signature"
        ) from None
