"""The fast path of the one canonical encoding (:mod:`corolla.verify.encoding`), for the
ledger's hot path: the same bytes, the same records, the same digests, fewer Python steps.

- :func:`encode` is :func:`~corolla.verify.encoding.canonical` for the values the ledger
  encodes most (request bodies parsed from JSON, entry payloads). Same bytes for every value it
  accepts (a dict with ``str`` keys, list, tuple, ``str``, ``bytes``, ``int`` in the signed
  64-bit range, ``bool``, ``None``; at most ``MAX_DEPTH`` nested containers) and
  :class:`~corolla.errors.InvalidInput` for anything else, floats included. It saves the general
  encoder's per-value bookkeeping: one type lookup per value, no item counting (these values are
  bounded by the service limits or built by the rules).
- :func:`read_request` and :func:`read_receipt` are ``StepRequest.from_bytes`` and
  ``Receipt.from_bytes`` with the record's ``signing_bytes()``. A record's canonical encoding has
  one fixed layout per record type (sorted keys, fixed-size values; an optional field gives it
  two), derived here from the record's field specs: it is read with one compiled pattern instead
  of the general decoder, and its signing bytes are the same bytes with the signature's key and
  value cut out (and the field count lowered by one) instead of a second encoding. Bytes that
  match no layout go through the general ``from_bytes``, which names what is wrong.
- :func:`signed_digest` is ``record.digest()`` and :func:`chain_digest` is
  :func:`corolla.verify.digests.chain_digest`, each encoded directly for values a record
  already validated.

Signatures are not checked here: :func:`corolla.verify.identity.verify_signature` does that.
Nothing runs at import but building the layouts; the property tests in
``tests/test_verify_fast.py`` hold every function here to its reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import struct
from typing import Any, TypeVar

from corolla.errors import InvalidInput
from corolla.verify.encoding import DOMAIN_PREFIX, MAX_DEPTH, canonical
from corolla.verify.receipts import Receipt, StepRequest

__all__ = ["chain_digest", "encode", "read_receipt", "read_request", "signed_digest"]

_U32 = struct.Struct(">I").pack
_I64 = struct.Struct(">q").pack

# ---------------------------------------------------------------------------------------------
# Values


def encode(value: Any) -> bytes:
    """The canonical bytes of ``value`` (:func:`~corolla.verify.encoding.canonical`'s)."""
    out: list[bytes] = []
    try:
        _encode(value, out, 0)
    except (struct.error, UnicodeEncodeError) as error:
        raise InvalidInput(f"cannot encode the value: {error}") from None
    return b"".join(out)


def _encode(value: Any, out: list[bytes], depth: int) -> None:
    kind = type(value)
    if kind is str:
        data = value.encode()
        out.append(b"\x04" + _U32(len(data)) + data)
    elif kind is bytes:
        out.append(b"\x05" + _U32(len(value)) + value)
    elif kind is int:
        out.append(b"\x03" + _I64(value))
    elif kind is dict:
        if depth >= MAX_DEPTH:
            raise InvalidInput(f"containers nested deeper than {MAX_DEPTH}")
        names = tuple(value)
        order = _ORDERS.get(names)
        if order is None:
            order = _order(names)
        out.append(order[0])
        for key, head in order[1]:
            out.append(head)
            item = value[key]
            if type(item) is int:  # the most common items, inline
                out.append(b"\x03" + _I64(item))
            else:
                _encode(item, out, depth + 1)
    elif kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise InvalidInput(f"containers nested deeper than {MAX_DEPTH}")
        out.append(b"\x06" + _U32(len(value)))
        for item in value:
            if type(item) is int:
                out.append(b"\x03" + _I64(item))
            else:
                _encode(item, out, depth + 1)
    elif value is None:
        out.append(b"\x00")
    elif value is True:
        out.append(b"\x02")
    elif value is False:
        out.append(b"\x01")
    else:
        # Subclasses (an IntEnum, a bytearray...) and everything the general encoder refuses.
        out.append(canonical(value))


_ORDERS: dict[tuple[Any, ...], tuple[bytes, tuple[tuple[str, bytes], ...]]] = {}
"""Dicts built by the same code have the same keys in the same order: their sorted, encoded
keys are kept (a bounded number of key sets)."""
_MAX_ORDERS = 4096


def _order(names: tuple[Any, ...]) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    keys = []
    for key in names:
        if type(key) is not str:
            raise InvalidInput(f"dict keys must be str, not {type(key).__name__}")
        raw = key.encode()
        keys.append((raw, key, _U32(len(raw)) + raw))
    keys.sort()
    order = (b"\x07" + _U32(len(keys)), tuple((key, head) for _, key, head in keys))
    if len(_ORDERS) < _MAX_ORDERS:
        _ORDERS[names] = order
    return order


# ---------------------------------------------------------------------------------------------
# Signed step records

_Record = TypeVar("_Record", StepRequest, Receipt)


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """One wire layout of a record type: which fields its pattern's groups capture."""

    pattern: re.Pattern[bytes]
    names: tuple[str, ...]  # fields captured by the pattern's groups, in order
    bounds: dict[str, tuple[int, int]]  # each int field's range, from its spec
    absent: tuple[str, ...]  # optional fields this layout encodes as None
    count_at: int  # offset of the field count
    count: int
    signature: tuple[int, int]  # the signature's key and value: [start, end)


def _layouts(cls: type[_Record]) -> dict[int, _Layout]:
    """Every layout of ``cls`` (one per choice of absent optional fields), by wire length."""
    specs = {field.name: field.metadata["spec"] for field in dataclasses.fields(cls)}
    optional = [name for name, spec in specs.items() if getattr(spec, "optional", False)]
    layouts = {}
    for choice in itertools.product((False, True), repeat=len(optional)):
        absent = tuple(name for name, gone in zip(optional, choice, strict=True) if gone)
        size, layout = _layout(cls, specs, absent)
        layouts[size] = layout
    return layouts


def _layout(
    cls: type[_Record], specs: dict[str, Any], absent: tuple[str, ...]
) -> tuple[int, _Layout]:
    # canonical(["corolla/v1/<domain>", [{fields}]]): list of 2, the domain, list of 1, a dict.
    domain = (DOMAIN_PREFIX + cls._DOMAIN).encode()
    head = b"\x06" + _U32(2) + b"\x04" + _U32(len(domain)) + domain + b"\x06" + _U32(1) + b"\x07"
    count_at = len(head)
    head += _U32(len(specs))
    parts, names, bounds = [re.escape(head)], [], {}
    offset, signature = len(head), (0, 0)
    for key in sorted(specs, key=str.encode):
        spec, raw = specs[key], key.encode()
        start = offset
        if key in absent:
            tag, width = b"\x00", 0
        elif hasattr(spec, "size"):
            tag, width = b"\x05" + _U32(spec.size), spec.size
        else:
            tag, width = b"\x03", 8
            bounds[key] = (spec.low, spec.high)
        parts.append(re.escape(_U32(len(raw)) + raw + tag) + (b"(.{%d})" % width if width else b""))
        if width:
            names.append(key)
        offset += 4 + len(raw) + len(tag) + width
        if key == "signature":
            signature = (start, offset)
    pattern = re.compile(b"".join(parts), re.DOTALL)
    layout = _Layout(pattern, tuple(names), bounds, absent, count_at, len(specs), signature)
    return offset, layout


def _read(cls: type[_Record], layout: _Layout, data: bytes) -> tuple[_Record, bytes] | None:
    match = layout.pattern.fullmatch(data)
    if match is None:
        return None
    # The pattern fixed every type and byte length; what is left of the constructor's checks
    # is each int's range and a non-empty span (anything else: the general path says why).
    record = object.__new__(cls)
    for name in layout.absent:
        object.__setattr__(record, name, None)
    bounds = layout.bounds
    for name, raw in zip(layout.names, match.groups(), strict=True):
        limits = bounds.get(name)
        if limits is None:
            object.__setattr__(record, name, raw)
            continue
        value = int.from_bytes(raw, "big", signed=True)
        if not limits[0] <= value <= limits[1]:
            return None
        object.__setattr__(record, name, value)
    if record.start >= record.end:
        return None
    cut, end = layout.signature
    signing = (
        data[: layout.count_at]
        + _U32(layout.count - 1)
        + data[layout.count_at + 4 : cut]
        + data[end:]
    )
    return record, signing


_REQUESTS = _layouts(StepRequest)
_RECEIPTS = _layouts(Receipt)


def read_request(data: bytes) -> tuple[StepRequest, bytes]:
    """``StepRequest.from_bytes(data)`` and its signing bytes; raises :class:`InvalidInput`."""
    return _read_any(StepRequest, _REQUESTS, data)


def read_receipt(data: bytes) -> tuple[Receipt, bytes]:
    """``Receipt.from_bytes(data)`` and its signing bytes; raises :class:`InvalidInput`."""
    return _read_any(Receipt, _RECEIPTS, data)


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


# ---------------------------------------------------------------------------------------------
# Digests


def signed_digest(record: StepRequest | Receipt, signing_bytes: bytes) -> bytes:
    """``record.digest()`` from signing bytes already in hand: the domain digest of the list
    (signing bytes, signature), encoded directly."""
    signature = record.signature
    return hashlib.sha256(
        b"".join(
            (
                _SIGNED_HEADS[type(record)],
                _U32(len(signing_bytes)),
                signing_bytes,
                b"\x05",
                _U32(len(signature)),
                signature,
            )
        )
    ).digest()


def chain_digest(previous: bytes, step: int, input_digest: bytes, output_digest: bytes) -> bytes:
    """:func:`corolla.verify.digests.chain_digest` for values a record already validated
    (32-byte digests, a step in range), encoded directly."""
    return hashlib.sha256(
        b"".join(
            (
                _CHAIN_HEAD,
                previous,
                b"\x03",
                _I64(step),
                _DIGEST_TAG,
                input_digest,
                _DIGEST_TAG,
                output_digest,
            )
        )
    ).digest()


def _domain_head(domain: str, parts: int) -> bytes:
    """The bytes of ``domain_message(domain, ...)`` before its ``parts`` values."""
    name = (DOMAIN_PREFIX + domain).encode()
    return b"\x06" + _U32(2) + b"\x04" + _U32(len(name)) + name + b"\x06" + _U32(parts)


_DIGEST_TAG = b"\x05" + _U32(32)
_SIGNED_HEADS = {
    cls: _domain_head("signed-" + cls._DOMAIN, 2) + b"\x05" for cls in (StepRequest, Receipt)
}
_CHAIN_HEAD = _domain_head("session-chain", 4) + _DIGEST_TAG
