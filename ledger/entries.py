"""The log as stored: entry kinds, the raw row forms the auditor reads without decoding, and
the fast leaf hash of a stored entry. The value types (:class:`~corolla.ledger.api.models.Entry`,
:class:`~corolla.ledger.api.models.Operation`) live in the API package, which clients import.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from corolla.errors import InvalidInput
from corolla.ledger.api.models import RawEntry
from corolla.verify.encoding import DOMAIN_PREFIX
from corolla.verify.merkle import leaf_hash

__all__ = ["KINDS", "RawEntry", "RawOperation", "raw_leaf_hash", "stored_json"]

KINDS = (
    "genesis",
    "account_registered",
    "work_credited",
    "verifier_fee",
    "reputation_changed",
    "ticket_bought",
    "ticket_redeemed",
    "slash",
    "fraud_evidence",
    "dispute",
    "serving_declared",
    "serving_withdrawn",
    "calibration_published",
)


RawOperation = tuple[int, bytes, bytes, int, str, bytes, bytes, int]
"""An operation as stored: ``(op, author, nonce, timestamp, action, body, signature, time)``."""

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")


def _bytes(value: bytes) -> bytes:
    return b"\x05" + _U32.pack(len(value)) + value


def _leaf_head() -> bytes:
    domain = (DOMAIN_PREFIX + "ledger-entry").encode()
    return (
        b"\x06" + _U32.pack(2) + b"\x04" + _U32.pack(len(domain)) + domain + b"\x06" + _U32.pack(10)
    )


_LEAF_HEAD = _leaf_head()


def raw_leaf_hash(entry: RawEntry) -> bytes:
    """:meth:`Entry.leaf_hash` of a stored entry, from its payload's canonical bytes as they
    are (the canonical encoding of a list is its items' encodings in a row, so the payload
    needs no decoding and re-encoding). Raises :class:`InvalidInput` for out-of-range fields."""
    seq, kind, account, amount, ref, payload, _, op_digest, author, signature, time = entry
    try:
        name = kind.encode()
        data = b"".join(
            (
                _LEAF_HEAD,
                b"\x03",
                _I64.pack(seq),
                b"\x04",
                _U32.pack(len(name)),
                name,
                _bytes(account),
                b"\x03",
                _I64.pack(amount),
                _bytes(ref),
                payload,
                _bytes(op_digest),
                _bytes(author),
                _bytes(signature),
                b"\x03",
                _I64.pack(time),
            )
        )
    except (struct.error, TypeError, AttributeError, UnicodeEncodeError) as error:
        raise InvalidInput(f"entry {seq} has a malformed field: {error}") from None
    return leaf_hash(data)


def stored_json(value: Any) -> bytes:
    """The compact JSON the log stores a body as (keys sorted; no floats reach it)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
