"""Canonical binary encoding of a small data model, and domain-separated digests.

Every signed or hashed thing in Corolla goes through :func:`canonical`, so two parties that agree
on a value agree on its bytes, and two different values never share bytes.

Data model and wire format (all lengths and counts are unsigned 32-bit big-endian)::

    None          0x00
    False / True  0x01 / 0x02
    int           0x03  8-byte big-endian two's complement (64-bit signed range only)
    str           0x04  length, UTF-8 bytes
    bytes         0x05  length, raw bytes
    list / tuple  0x06  count, items                  (a tuple encodes as, and decodes to, a list)
    dict          0x07  count, (key length, key UTF-8, value) with keys strictly increasing
                        by their UTF-8 bytes

Every value carries a type tag and every variable part a length, so the encoding is prefix-free:
``"1"``, ``1``, ``b"1"`` and ``True`` differ in the tag, ``[]`` and ``{}`` too, and
``["ab"]`` never collides with ``["a", "b"]``. :func:`decode` is the strict inverse: it accepts
exactly the bytes :func:`canonical` produces and raises :class:`~corolla.errors.InvalidInput` on
anything else, which makes it safe on bytes from the network.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Any

from corolla.errors import InvalidInput

__all__ = [
    "DOMAIN_PREFIX",
    "INT_MAX",
    "INT_MIN",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "Value",
    "canonical",
    "decode",
    "domain_digest",
    "domain_message",
    "from_lower_hex",
]

# Values of the data model; ``Any`` because the model is recursive and checked at run time.
Value = Any

DOMAIN_PREFIX = "corolla/v1/"
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
MAX_DEPTH = 32
"""Most containers (lists and dicts) that may nest inside one another."""
MAX_ITEMS = 1_000_000
"""Most values (containers, keys excluded, and scalars) in one encoded document."""
_MAX_LENGTH = 2**32 - 1

_NONE = 0x00
_FALSE = 0x01
_TRUE = 0x02
_INT = 0x03
_STR = 0x04
_BYTES = 0x05
_LIST = 0x06
_DICT = 0x07

_INT64 = struct.Struct(">q")
_UINT32 = struct.Struct(">I")


def canonical(value: Value) -> bytes:
    """Encode ``value`` to its one canonical byte string.

    Raises :class:`InvalidInput` for floats, other types, non-``str`` dict keys, integers outside
    the signed 64-bit range, strings that are not valid Unicode scalar sequences, nesting deeper
    than :data:`MAX_DEPTH` (which also stops self-referencing containers) or more than
    :data:`MAX_ITEMS` values.
    """
    out = bytearray()
    _Encoder(out).encode(value, 0)
    return bytes(out)


def decode(data: bytes | bytearray | memoryview, *, max_items: int = MAX_ITEMS) -> Value:
    """Decode bytes made by :func:`canonical`; strict, and raises only :class:`InvalidInput`.

    Rejects unknown tags, truncation, trailing bytes, invalid UTF-8, unsorted or duplicate dict
    keys, nesting deeper than :data:`MAX_DEPTH` and more than ``max_items`` values.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"can only decode bytes, not {type(data).__name__}")
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"cannot read the buffer as bytes: {error}") from None
    reader = _Reader(view, max_items)
    value = reader.read_value(0)
    if reader.pos != len(reader.data):
        raise InvalidInput(f"{len(reader.data) - reader.pos} trailing bytes after encoded value")
    return value


def domain_message(domain: str, *parts: Value) -> bytes:
    """The canonical bytes of ``["corolla/v1/" + domain, list(parts)]``: what gets signed."""
    if not isinstance(domain, str) or not domain:
        raise InvalidInput("a domain must be a non-empty string")
    return canonical([DOMAIN_PREFIX + domain, list(parts)])


def domain_digest(domain: str, *parts: Value) -> bytes:
    """SHA-256 of :func:`domain_message` (32 bytes): one domain per kind of hashed thing."""
    return hashlib.sha256(domain_message(domain, *parts)).digest()


class _Encoder:
    __slots__ = ("items", "out")

    def __init__(self, out: bytearray) -> None:
        self.out = out
        self.items = 0

    def encode(self, value: Value, depth: int) -> None:
        self.items += 1
        if self.items > MAX_ITEMS:
            raise InvalidInput(f"value holds more than {MAX_ITEMS} items")
        out = self.out
        kind = type(value)
        if kind is bytes:  # the common case first: digests, keys, signatures
            out.append(_BYTES)
            out += _UINT32.pack(_length(len(value)))
            out += value
        elif value is None:
            out.append(_NONE)
        elif value is True:
            out.append(_TRUE)
        elif value is False:
            out.append(_FALSE)
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise InvalidInput(f"integer {value} is outside the signed 64-bit range")
            out.append(_INT)
            out += _INT64.pack(value)
        elif isinstance(value, str):
            out.append(_STR)
            self._raw(_utf8(value))
        elif isinstance(value, bytes | bytearray | memoryview):
            out.append(_BYTES)
            self._raw(bytes(value))
        elif isinstance(value, list | tuple):
            depth = _deeper(depth)
            out.append(_LIST)
            out += _UINT32.pack(_length(len(value)))
            for item in value:
                self.encode(item, depth)
        elif isinstance(value, dict):
            depth = _deeper(depth)
            entries = []
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidInput(f"dict keys must be str, not {type(key).__name__}")
                entries.append((_utf8(key), item))
            entries.sort(key=_first)
            out.append(_DICT)
            out += _UINT32.pack(_length(len(entries)))
            for key_bytes, item in entries:
                self._raw(key_bytes)
                self.encode(item, depth)
        else:
            raise InvalidInput(f"cannot encode a value of type {type(value).__name__}")

    def _raw(self, data: bytes) -> None:
        self.out += _UINT32.pack(_length(len(data)))
        self.out += data


def _first(entry: tuple[bytes, Value]) -> bytes:
    return entry[0]


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInput(f"string is not valid Unicode: {error.reason}") from None


def _length(length: int) -> int:
    if length > _MAX_LENGTH:
        raise InvalidInput(f"length {length} does not fit in 32 bits")
    return length


def _deeper(depth: int) -> int:
    if depth >= MAX_DEPTH:
        raise InvalidInput(f"containers nested deeper than {MAX_DEPTH}")
    return depth + 1


class _Reader:
    __slots__ = ("data", "items", "max_items", "pos")

    def __init__(self, data: memoryview, max_items: int) -> None:
        self.data = data
        self.pos = 0
        self.items = 0
        self.max_items = max_items

    def take(self, size: int) -> memoryview:
        end = self.pos + size
        if end > len(self.data):
            raise InvalidInput(
                f"truncated: need {size} bytes at offset {self.pos}, "
                f"have {len(self.data) - self.pos}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def read_u32(self) -> int:
        return _UINT32.unpack(self.take(4))[0]

    def read_text(self) -> tuple[str, bytes]:
        raw = bytes(self.take(self.read_u32()))
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError as error:
            raise InvalidInput(f"invalid UTF-8 in string: {error.reason}") from None

    def read_count(self) -> int:
        count = self.read_u32()
        # Every item takes at least one byte: a count beyond what is left is a lie.
        if count > len(self.data) - self.pos:
            raise InvalidInput(f"truncated: {count} items announced, too few bytes left")
        return count

    def read_value(self, depth: int) -> Value:
        self.items += 1
        if self.items > self.max_items:
            raise InvalidInput(f"encoded value holds more than {self.max_items} items")
        tag = self.take(1)[0]
        if tag == _NONE:
            return None
        if tag == _FALSE:
            return False
        if tag == _TRUE:
            return True
        if tag == _INT:
            return _INT64.unpack(self.take(8))[0]
        if tag == _STR:
            return self.read_text()[0]
        if tag == _BYTES:
            return bytes(self.take(self.read_u32()))
        if tag == _LIST:
            depth = _deeper(depth)
            return [self.read_value(depth) for _ in range(self.read_count())]
        if tag == _DICT:
            depth = _deeper(depth)
            result: dict[str, Value] = {}
            previous: bytes | None = None
            for _ in range(self.read_count()):
                key, key_bytes = self.read_text()
                if previous is not None and key_bytes <= previous:
                    raise InvalidInput(f"dict key {key!r} is duplicated or out of order")
                previous = key_bytes
                result[key] = self.read_value(depth)
            return result
        raise InvalidInput(f"unknown type tag 0x{tag:02x} at offset {self.pos - 1}")


_LOWER_HEX = re.compile(r"(?:[0-9a-f]{2})*")


def from_lower_hex(value: Any, what: str) -> bytes:
    """Bytes from lowercase hex text (how records travel in JSON); raises
    :class:`InvalidInput` naming ``what`` for anything else."""
    if not isinstance(value, str) or _LOWER_HEX.fullmatch(value) is None:
        raise InvalidInput(f"{what} must be lowercase hex text")
    return bytes.fromhex(value)
