"""The ledger API's value types: what the HTTP API returns and what a client holds (log
entries, the operations behind them, accounts), with their strict JSON forms, and the parsing
helpers every side of the API shares. Imports nothing of the ledger's rules, state or store.

An entry's leaf hash (RFC 6962, over :meth:`Entry.leaf_bytes`) covers its whole content:
sequence number, kind, account, amount, evidence reference, payload, the digest of the operation
(so the body and the author's signature behind it), the author and their signature, and the
time. Changing any byte of an entry, or of the operation behind it, changes what an auditor
recomputes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from corolla.errors import InvalidInput
from corolla.ledger.api.envelope import Envelope, body_digest
from corolla.verify.encoding import canonical, decode, domain_message
from corolla.verify.merkle import leaf_hash

__all__ = [
    "Account",
    "Draft",
    "Entry",
    "Operation",
    "RawEntry",
    "b64decode",
    "b64encode",
    "from_hex",
    "parse_json",
]

_HEX = re.compile(r"(?:[0-9a-f]{2})*")

RawEntry = tuple[int, str, bytes, int, bytes, bytes, int, bytes, bytes, bytes, int]
"""An entry as stored: ``(seq, kind, account, amount, ref, payload, op, op_digest, author,
author_signature, time)`` with the payload as its canonical bytes (what the auditor hashes
without decoding)."""


@dataclass(frozen=True, slots=True)
class Account:
    """An account's derived state. A slashed account earns nothing more and is never trusted
    as a verifier again."""

    key: bytes
    name: str
    balance: int
    reputation: int
    slashed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the API serves (and ``corolla ledger ... --json`` prints)."""
        return {
            "account": self.key.hex(),
            "name": self.name,
            "balance": self.balance,
            "reputation": self.reputation,
            "slashed": self.slashed,
        }


@dataclass(frozen=True, slots=True)
class Draft:
    """An entry an operation wants to append, before the log numbers and stamps it."""

    kind: str
    account: bytes
    amount: int
    ref: bytes
    payload: Any


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the append-only log: one leaf of its Merkle tree."""

    seq: int
    kind: str
    account: bytes
    amount: int
    ref: bytes
    payload: Any
    op: int
    op_digest: bytes
    author: bytes
    author_signature: bytes
    time: int

    def leaf_bytes(self) -> bytes:
        """The canonical bytes the leaf hash covers (domain ``ledger-entry``)."""
        return domain_message(
            "ledger-entry",
            self.seq,
            self.kind,
            self.account,
            self.amount,
            self.ref,
            self.payload,
            self.op_digest,
            self.author,
            self.author_signature,
            self.time,
        )

    def leaf_hash(self) -> bytes:
        """RFC 6962 leaf hash of :meth:`leaf_bytes`."""
        return leaf_hash(self.leaf_bytes())

    def raw(self) -> RawEntry:
        """The stored form (payload as canonical bytes)."""
        return (
            self.seq,
            self.kind,
            self.account,
            self.amount,
            self.ref,
            canonical(self.payload),
            self.op,
            self.op_digest,
            self.author,
            self.author_signature,
            self.time,
        )

    def draft(self) -> Draft:
        """The part an operation decides (what replaying the operation must reproduce)."""
        return Draft(self.kind, self.account, self.amount, self.ref, self.payload)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: bytes as hex, the payload as base64 of its canonical bytes."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "account": self.account.hex(),
            "amount": self.amount,
            "ref": self.ref.hex(),
            "payload": b64encode(canonical(self.payload)),
            "op": self.op,
            "op_digest": self.op_digest.hex(),
            "author": self.author.hex(),
            "author_signature": self.author_signature.hex(),
            "time": self.time,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Entry:
        """Parse :meth:`to_dict` output; raises :class:`InvalidInput` on anything else."""
        if not isinstance(data, dict):
            raise InvalidInput("an entry must be a JSON object")
        try:
            return cls(
                seq=_int(data["seq"]),
                kind=_str(data["kind"]),
                account=from_hex(data["account"]),
                amount=_int(data["amount"]),
                ref=from_hex(data["ref"]),
                payload=decode(b64decode(data["payload"])),
                op=_int(data["op"]),
                op_digest=from_hex(data["op_digest"]),
                author=from_hex(data["author"]),
                author_signature=from_hex(data["author_signature"]),
                time=_int(data["time"]),
            )
        except KeyError as error:
            raise InvalidInput(f"entry is missing field {error}") from None


@dataclass(frozen=True, slots=True)
class Operation:
    """A signed request the ledger accepted, its body (compact JSON, :func:`stored_json`) and
    its time of receipt. The envelope's body digest covers the canonical encoding of the body's
    value, so the JSON is only a compact, fast-to-parse container for it."""

    op: int
    envelope: Envelope
    body: bytes
    time: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: bytes as hex, the body as its JSON text."""
        envelope = self.envelope
        return {
            "op": self.op,
            "author": envelope.author.hex(),
            "nonce": envelope.nonce.hex(),
            "timestamp": envelope.timestamp,
            "action": envelope.action,
            "signature": envelope.signature.hex(),
            "body": self.body.decode("utf-8"),
            "time": self.time,
        }

    def value(self) -> Any:
        """The body's value."""
        return parse_json(self.body)

    @classmethod
    def from_dict(cls, data: Any) -> Operation:
        """Parse :meth:`to_dict` output; the body digest is recomputed from the body."""
        if not isinstance(data, dict):
            raise InvalidInput("an operation must be a JSON object")
        try:
            text = data["body"]
            if not isinstance(text, str):
                raise InvalidInput("an operation's body must be JSON text")
            body = text.encode("utf-8")
            envelope = Envelope(
                author=from_hex(data["author"]),
                nonce=from_hex(data["nonce"]),
                timestamp=_int(data["timestamp"]),
                action=_str(data["action"]),
                body_digest=body_digest(canonical(parse_json(body))),
                signature=from_hex(data["signature"]),
            )
            return cls(op=_int(data["op"]), envelope=envelope, body=body, time=_int(data["time"]))
        except KeyError as error:
            raise InvalidInput(f"operation is missing field {error}") from None


def parse_json(data: bytes) -> Any:
    """Strict JSON parsing (no NaN or Infinity); raises :class:`InvalidInput`."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput(f"not valid JSON: {error}") from None


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a number JSON allows")


def from_hex(value: Any) -> bytes:
    """Lowercase hex to bytes; raises :class:`InvalidInput`."""
    if not isinstance(value, str) or _HEX.fullmatch(value) is None:
        raise InvalidInput(f"expected lowercase hex, got {str(value)[:40]!r}")
    return bytes.fromhex(value)


def b64encode(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def b64decode(value: Any) -> bytes:
    """Strict standard base64 to bytes; raises :class:`InvalidInput`."""
    if not isinstance(value, str):
        raise InvalidInput("expected base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidInput("invalid base64") from None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"expected an integer, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"expected a string, got {type(value).__name__}")
    return value
