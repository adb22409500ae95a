"""A faster path to the canonical encoding (:func:`corolla.verify.encoding.canonical`) of the
values the ledger encodes most: request bodies parsed from JSON and entry payloads.

Same bytes for every value it accepts (a dict with ``str`` keys, list, tuple, ``str``,
``bytes``, ``int`` in the signed 64-bit range, ``bool``, ``None``; at most ``MAX_DEPTH`` nested
containers), and :class:`~corolla.errors.InvalidInput` for anything else, floats included.
What it saves is the general encoder's per-value bookkeeping: one type lookup per value, no
item counting (these values are bounded by the service limits or built by the rules). Checked
against the general encoder when this module loads, and by the tests.
"""

from __future__ import annotations

import struct
from typing import Any

from corolla.errors import InvalidInput
from corolla.verify.encoding import MAX_DEPTH, canonical

__all__ = ["encode"]

_U32 = struct.Struct(">I").pack
_I64 = struct.Struct(">q").pack


def encode(value: Any) -> bytes:
    """The canonical bytes of ``value``."""
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


def _check() -> None:
    sample = {
        "pairs": [{"request": "AAEC", "receipt": "é"}],
        "n": -(2**63),
        "m": 2**63 - 1,
        "b": [True, False, None, b"\x00\xff", ()],
        "": {},
    }
    if encode(sample) != canonical(sample):
        raise RuntimeError("ledger.canonical.encode disagrees with verify.encoding.canonical")


_check()
