"""The signed envelope around every request that changes the ledger.

A mutating request is ``(action, body)`` plus an envelope: the author's public key, a fresh
16-byte nonce, a timestamp (ms since the epoch) and an Ed25519 signature over the canonical,
domain-separated encoding (domain ``ledger-request``) of all of them and the body's digest.
The ledger refuses a signature that does not verify, a timestamp outside its clock window and a
nonce the author already used inside that window, so a captured request cannot be replayed,
delayed or redirected to another action. Over HTTP the envelope travels in four headers.

The body's digest covers the canonical encoding of the parsed JSON body (so whitespace and key
order do not matter, and floats are refused): the log stores exactly those bytes, and anyone can
re-check the author's signature on every operation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from corolla.errors import InvalidInput
from corolla.verify.encoding import INT_MAX, canonical, domain_digest, domain_message
from corolla.verify.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    verify_signature,
)

__all__ = [
    "ACTIONS",
    "HEADER_AUTHOR",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "NONCE_SIZE",
    "Envelope",
    "body_digest",
    "canonical_body",
    "now_ms",
    "sign_envelope",
    "verify_envelope",
]

NONCE_SIZE = 16
ACTIONS = (
    "genesis",
    "register",
    "report",
    "buy-ticket",
    "redeem",
    "evidence",
    "slash",
    "serving",
    "serving-withdraw",
    "calibrate",
    "dispute",
)
HEADER_AUTHOR = "X-Corolla-Author"
HEADER_NONCE = "X-Corolla-Nonce"
HEADER_TIMESTAMP = "X-Corolla-Timestamp"
HEADER_SIGNATURE = "X-Corolla-Signature"
_HEX = re.compile(r"(?:[0-9a-f]{2})+")


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch (the ledger's unit of time)."""
    return time.time_ns() // 1_000_000


def body_digest(body: bytes) -> bytes:
    """Digest of a body's canonical bytes (domain ``ledger-body``)."""
    return domain_digest("ledger-body", hashlib.sha256(body).digest())


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who sent a request, when, for which action and body, and their signature over it."""

    author: bytes
    nonce: bytes
    timestamp: int
    action: str
    body_digest: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_bytes("author", self.author, PUBLIC_KEY_SIZE)
        _check_bytes("nonce", self.nonce, NONCE_SIZE)
        _check_bytes("body digest", self.body_digest, 32)
        _check_bytes("signature", self.signature, SIGNATURE_SIZE)
        if isinstance(self.timestamp, bool) or not isinstance(self.timestamp, int):
            raise InvalidInput("request timestamp must be an int (ms since the epoch)")
        if not 0 <= self.timestamp <= INT_MAX:
            raise InvalidInput("request timestamp is out of range")
        if self.action not in ACTIONS:
            raise InvalidInput(f"unknown ledger action {self.action!r}")

    def signing_bytes(self) -> bytes:
        """What the author signs."""
        return domain_message(
            "ledger-request",
            self.author,
            self.nonce,
            self.timestamp,
            self.action,
            self.body_digest,
        )

    def digest(self) -> bytes:
        """Identity of the signed operation (covered by every log entry it produced)."""
        return domain_digest("ledger-operation", self.signing_bytes(), self.signature)

    def to_headers(self) -> dict[str, str]:
        """The four HTTP headers that carry the envelope (the action is the route)."""
        return {
            HEADER_AUTHOR: self.author.hex(),
            HEADER_NONCE: self.nonce.hex(),
            HEADER_TIMESTAMP: str(self.timestamp),
            HEADER_SIGNATURE: self.signature.hex(),
        }

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], action: str, body: bytes) -> Envelope:
        """Rebuild the envelope of an HTTP request; raises :class:`InvalidInput` if a header is
        missing or malformed (the signature is checked by :func:`verify_envelope`)."""
        values = {}
        for name in (HEADER_AUTHOR, HEADER_NONCE, HEADER_TIMESTAMP, HEADER_SIGNATURE):
            value = headers.get(name)
            if value is None:
                raise InvalidInput(f"unsigned request: header {name} is missing")
            values[name] = value
        stamp = values[HEADER_TIMESTAMP]
        if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 18:
            raise InvalidInput(f"header {HEADER_TIMESTAMP} must be ms since the epoch")
        return cls(
            author=_from_hex(HEADER_AUTHOR, values[HEADER_AUTHOR]),
            nonce=_from_hex(HEADER_NONCE, values[HEADER_NONCE]),
            timestamp=int(stamp),
            action=action,
            body_digest=body_digest(body),
            signature=_from_hex(HEADER_SIGNATURE, values[HEADER_SIGNATURE]),
        )


def sign_envelope(
    identity: Identity,
    action: str,
    body: bytes,
    *,
    nonce: bytes | None = None,
    timestamp: int | None = None,
) -> Envelope:
    """Sign ``body`` (canonical bytes, see :func:`canonical_body`) for ``action`` as
    ``identity``, with a fresh random nonce and the current time unless given."""
    unsigned = Envelope(
        author=identity.public_key,
        nonce=secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce,
        timestamp=now_ms() if timestamp is None else timestamp,
        action=action,
        body_digest=body_digest(body),
        signature=bytes(SIGNATURE_SIZE),
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))


def verify_envelope(envelope: Envelope) -> None:
    """Check the author's signature; raises :class:`~corolla.errors.BadSignature`."""
    verify_signature(envelope.author, envelope.signing_bytes(), envelope.signature)


def canonical_body(value: object) -> bytes:
    """The canonical bytes of a JSON body (what is signed and stored)."""
    return canonical(value)


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidInput(f"request {name} must be {size} bytes")


def _from_hex(name: str, text: str) -> bytes:
    if _HEX.fullmatch(text) is None:
        raise InvalidInput(f"header {name} must be lowercase hex")
    return bytes.fromhex(text)
