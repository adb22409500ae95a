"""Fast reading of signed step records in their wire form (``StepRequest.to_bytes()``,
``Receipt.to_bytes()``), with their signing bytes, for the ledger's hot path.

A record's canonical encoding has one fixed layout per record type (sorted keys, fixed-size
values; a request's optional ticket gives it two), so it is read with one compiled pattern
instead of the general decoder, and its signing bytes are the same bytes with the signature's
key and value cut out (and the field count lowered by one) instead of a second encoding. Both
layouts are derived from the encoder itself and checked against it when this module loads;
bytes that match no layout go through the general ``from_bytes`` (which names what is wrong).
The record is always built through its validating constructor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
from typing import Any, TypeVar

from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from corolla.errors import BadSignature, InvalidInput
from corolla.verify.digests import chain_digest as reference_chain_digest
from corolla.verify.encoding import DOMAIN_PREFIX
from corolla.verify.identity import SIGNATURE_SIZE, peer_name_of
from corolla.verify.receipts import Receipt, StepRequest

__all__ = ["chain_digest", "check_signature", "read_receipt", "read_request", "signed_digest"]

_Record = TypeVar("_Record", StepRequest, Receipt)
_U32 = struct.Struct(">I")


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    pattern: re.Pattern[bytes]
    ints: frozenset[str]
    names: tuple[str, ...]  # fields captured by the pattern's groups, in order
    fixed: dict[str, Any]  # fields the layout fixes (a missing ticket)
    count_at: int  # offset of the field count
    count: int
    signature: tuple[int, int]  # the signature's key and value: [start, end)
    bounds: dict[str, tuple[int, int]]  # each int field's range, from the record's field specs


def _layouts(cls: type[_Record], prototypes: list[_Record]) -> dict[int, _Layout]:
    """One layout per prototype (the wire length tells them apart), from its field values."""
    layouts = {}
    for prototype in prototypes:
        values = {f.name: getattr(prototype, f.name) for f in dataclasses.fields(prototype)}
        domain = (DOMAIN_PREFIX + cls._DOMAIN).encode()
        head = b"\x06" + _U32.pack(2) + b"\x04" + _U32.pack(len(domain)) + domain + b"\x06"
        head += _U32.pack(1) + b"\x07"
        count_at = len(head)
        head += _U32.pack(len(values))
        parts, names, ints, fixed = [re.escape(head)], [], set(), {}
        offset, signature = len(head), (0, 0)
        for key in sorted(values, key=str.encode):
            raw_key = key.encode()
            key_bytes = _U32.pack(len(raw_key)) + raw_key
            start = offset
            value = values[key]
            if value is None:
                fixed[key] = None
                value_bytes, group = b"\x00", b""
            elif isinstance(value, int):
                ints.add(key)
                value_bytes, group = b"\x03", b"(.{8})"
                offset += 8
            else:
                value_bytes, group = b"\x05" + _U32.pack(len(value)), b"(.{%d})" % len(value)
                offset += len(value)
            if group:
                names.append(key)
            parts.append(re.escape(key_bytes + value_bytes) + group)
            offset += len(key_bytes) + len(value_bytes)
            if key == "signature":
                signature = (start, offset)
        specs = {f.name: f.metadata.get("spec") for f in dataclasses.fields(prototype)}
        bounds = {name: (specs[name].low, specs[name].high) for name in ints}  # type: ignore[union-attr]
        layout = _Layout(
            re.compile(b"".join(parts), re.DOTALL),
            frozenset(ints),
            tuple(names),
            fixed,
            count_at,
            len(values),
            signature,
            bounds,
        )
        wire = prototype.to_bytes()
        # The layout must read back exactly what the encoder wrote, or it is not used at all.
        if len(wire) != offset or _read(cls, layout, wire) != (
            prototype,
            prototype.signing_bytes(),
        ):
            return {}
        layouts[offset] = layout
    return layouts


def _read(cls: type[_Record], layout: _Layout, data: bytes) -> tuple[_Record, bytes] | None:
    match = layout.pattern.fullmatch(data)
    if match is None:
        return None
    # The pattern fixed every type and byte length; what is left of the constructor's checks
    # is each int's range and a non-empty span (anything else: the general path says why).
    record = object.__new__(cls)
    for name, value in layout.fixed.items():
        object.__setattr__(record, name, value)
    ints, bounds = layout.ints, layout.bounds
    for name, raw in zip(layout.names, match.groups(), strict=True):
        if name in ints:
            value = int.from_bytes(raw, "big", signed=True)
            low, high = bounds[name]
            if not low <= value <= high:
                return None
            object.__setattr__(record, name, value)
        else:
            object.__setattr__(record, name, raw)
    if record.start >= record.end:
        return None
    cut, end = layout.signature
    signing = (
        data[: layout.count_at]
        + _U32.pack(layout.count - 1)
        + data[layout.count_at + 4 : cut]
        + data[end:]
    )
    return record, signing


def _prototype_request(ticket: bytes | None) -> StepRequest:
    return StepRequest(
        protocol_version=1,
        model_digest=bytes(range(32)),
        span_digest=bytes(range(1, 33)),
        start=0,
        end=1,
        session_id=bytes(16),
        step=0,
        position=0,
        tokens=1,
        input_digest=bytes(range(2, 34)),
        client_key=bytes(range(3, 35)),
        ticket_digest=ticket,
        signature=bytes(range(64)),
    )


def _prototype_receipt() -> Receipt:
    digest = bytes(range(32))
    return Receipt(
        protocol_version=1,
        model_digest=digest,
        span_digest=digest,
        start=0,
        end=1,
        session_id=bytes(16),
        step=0,
        position=0,
        tokens=1,
        client_key=digest,
        node_key=digest,
        request_digest=digest,
        input_digest=digest,
        output_digest=digest,
        chain_digest=digest,
        signature=bytes(range(SIGNATURE_SIZE)),
    )


_REQUESTS = _layouts(StepRequest, [_prototype_request(None), _prototype_request(bytes(32))])
_RECEIPTS = _layouts(Receipt, [_prototype_receipt()])


def read_request(data: bytes) -> tuple[StepRequest, bytes]:
    """A request from its wire bytes, and its signing bytes; raises :class:`InvalidInput`."""
    return _read_any(StepRequest, _REQUESTS, data)


def read_receipt(data: bytes) -> tuple[Receipt, bytes]:
    """A receipt from its wire bytes, and its signing bytes; raises :class:`InvalidInput`."""
    return _read_any(Receipt, _RECEIPTS, data)


def signed_digest(record: StepRequest | Receipt, signing_bytes: bytes) -> bytes:
    """``record.digest()`` from signing bytes already in hand (the same formula, encoded
    directly: a list of two byte strings under the record's domain)."""
    head = _SIGNED_HEADS[type(record)]
    signature = record.signature
    return hashlib.sha256(
        b"".join(
            (
                head,
                _U32.pack(len(signing_bytes)),
                signing_bytes,
                b"\x05",
                _U32.pack(len(signature)),
                signature,
            )
        )
    ).digest()


def check_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """:func:`corolla.verify.identity.verify_signature` for a key and a signature a record
    already validated (32 and 64 bytes), without its per-call wrapping; raises
    :class:`~corolla.errors.BadSignature` with the same message."""
    try:
        crypto_sign_open(signature + message, public_key)
    except (CryptoError, ValueError, TypeError):
        raise BadSignature(
            f"signature does not verify under key {peer_name_of(public_key)}"
        ) from None


def chain_digest(previous: bytes, step: int, input_digest: bytes, output_digest: bytes) -> bytes:
    """:func:`corolla.verify.digests.chain_digest` for values already validated (32-byte
    digests, a step in range), encoded directly."""
    return hashlib.sha256(
        b"".join(
            (
                _CHAIN_HEAD,
                previous,
                b"\x03",
                _I64.pack(step),
                _DIGEST_TAG,
                input_digest,
                _DIGEST_TAG,
                output_digest,
            )
        )
    ).digest()


def _domain_head(domain: str, parts: int) -> bytes:
    name = (DOMAIN_PREFIX + domain).encode()
    return (
        b"\x06" + _U32.pack(2) + b"\x04" + _U32.pack(len(name)) + name + b"\x06" + _U32.pack(parts)
    )


_I64 = struct.Struct(">q")
_DIGEST_TAG = b"\x05" + _U32.pack(32)
_SIGNED_HEADS = {
    cls: _domain_head("signed-" + cls._DOMAIN, 2) + b"\x05" for cls in (StepRequest, Receipt)
}
_CHAIN_HEAD = _domain_head("session-chain", 4) + _DIGEST_TAG


def _check_digests() -> None:
    """The direct encodings must give the reference digests (checked once, at import)."""
    request = _prototype_request(None)
    receipt = _prototype_receipt()
    for record in (request, receipt):
        if signed_digest(record, record.signing_bytes()) != record.digest():
            raise RuntimeError(f"records.signed_digest disagrees with {type(record).__name__}")
    parts = (bytes(range(32)), 2**40, bytes(32), bytes(range(1, 33)))
    if chain_digest(*parts) != reference_chain_digest(*parts):
        raise RuntimeError("records.chain_digest disagrees with verify.digests.chain_digest")


_check_digests()


def _read_any(
    cls: type[_Record], layouts: dict[int, _Layout], data: bytes
) -> tuple[_Record, bytes]:
    if not isinstance(data, bytes):
        raise InvalidInput(f"an encoded {cls.__name__} must be bytes")
    layout = layouts.get(len(data))
    found = None if layout is None else _read(cls, layout, data)
    if found is not None:
        return found
    record = cls.from_bytes(data)  # raises InvalidInput naming what is wrong
    return record, record.signing_bytes()
