"""Canonical encoding: round trips, no collisions, strict decoding, domain-separated digests."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla.errors import InvalidInput
from corolla.verify.encoding import (
    INT_MAX,
    INT_MIN,
    MAX_DEPTH,
    canonical,
    decode,
    domain_digest,
    domain_message,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT_MIN, max_value=INT_MAX)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)


def _same(a: object, b: object) -> bool:
    """Equality that also tells 1 from True and 0 from False, at every level."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[key], b[key]) for key in a)
    return a == b


def _sorted_dicts(value: object) -> object:
    if isinstance(value, list):
        return [_sorted_dicts(item) for item in value]
    if isinstance(value, dict):
        return {key: _sorted_dicts(value[key]) for key in sorted(value, key=str.encode)}
    return value


def _nested_lists(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_format_is_frozen_to_the_documented_bytes() -> None:
    # Everything ever signed depends on these bytes: a change here breaks every old signature.
    expected = bytes.fromhex(
        "06 00000006"  # list of 6
        " 00"  # None
        " 02"  # True
        " 03 ffffffffffffffff"  # -1
        " 04 00000002 c3a9"  # "é"
        " 05 00000001 00"  # b"\x00"
        " 07 00000002 00000001 61 01 00000001 62 06 00000000"  # {"a": False, "b": []}
    )
    assert canonical([None, True, -1, "é", b"\x00", {"b": [], "a": False}]) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        INT_MIN,
        INT_MAX,
        "",
        "héllo wörld ✓ 🌸",
        b"",
        bytes(range(256)),
        [],
        {},
        [[], {}, [[]]],
        {"z": 1, "a": [None, b"x"], "é": {"": ""}},
    ],
)
def test_round_trip_returns_the_same_value(value: object) -> None:
    assert _same(decode(canonical(value)), _sorted_dicts(value))


@FUZZ
@given(values)
def test_round_trip_holds_for_generated_values(value: object) -> None:
    # A round trip that keeps types also proves that no two values share an encoding.
    encoded = canonical(value)
    assert _same(decode(encoded), _sorted_dicts(value))
    assert canonical(decode(encoded)) == encoded


def test_tuples_encode_as_lists_and_decode_to_lists() -> None:
    assert canonical((1, "a")) == canonical([1, "a"])
    assert decode(canonical((1, (2,)))) == [1, [2]]


def test_dict_encoding_ignores_insertion_order() -> None:
    assert canonical({"b": 1, "a": 2, "é": 3}) == canonical({"é": 3, "a": 2, "b": 1})


def test_distinct_values_that_look_alike_never_collide() -> None:
    tricky = [
        None,
        False,
        True,
        0,
        1,
        "1",
        b"1",
        "",
        b"",
        [],
        {},
        [None],
        [[]],
        [[], []],
        [{}],
        ["ab"],
        ["a", "b"],
        [b"ab"],
        ["a", ["b"]],
        [["a"], "b"],
        {"a": 1},
        ["a", 1],
        {"a": "b"},
        {"ab": ""},
        {"a": "", "b": ""},
        {"": "ab"},
        [1, 2],
        [258],
        "\x00",
        b"\x00",
        [0],
        [False],
    ]
    encodings = [canonical(value) for value in tricky]
    assert len(set(encodings)) == len(tricky)


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        math.nan,
        {1, 2},
        object(),
        {1: "a"},
        {b"k": 1},
        [1.0],
        2**63,
        INT_MIN - 1,
        "\ud800",
        {"\udfff": 1},
        _nested_lists(MAX_DEPTH + 1),
    ],
    ids=lambda value: type(value).__name__,
)
def test_canonical_rejects_values_outside_the_data_model(value: object) -> None:
    with pytest.raises(InvalidInput):
        canonical(value)


def test_canonical_rejects_a_self_referencing_list() -> None:
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(InvalidInput, match="nested deeper"):
        canonical(cycle)


def test_nesting_up_to_the_limit_round_trips() -> None:
    value = _nested_lists(MAX_DEPTH)
    assert decode(canonical(value)) == value


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x00\x00", "trailing"),
        (b"\x08", "unknown type tag"),
        (b"\xff", "unknown type tag"),
        (b"\x03\x00\x00", "truncated"),
        (b"\x04\x00\x00\x00\x05abc", "truncated"),
        (b"\x04\x00\x00\x00\x02\xc3\x28", "UTF-8"),
        (b"\x04\x00\x00\x00\x03\xed\xa0\x80", "UTF-8"),  # an encoded surrogate
        (b"\x04\x00\x00\x00\x02\xc0\x80", "UTF-8"),  # an overlong NUL
        (b"\x06\xff\xff\xff\xff\x00", "truncated"),
        (b"\x07\x00\x00\x00\x02\x00\x00\x00\x01b\x00\x00\x00\x00\x01a\x00", "out of order"),
        (b"\x07\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x00\x01a\x00", "duplicated"),
        (b"\x06\x00\x00\x00\x01" * (MAX_DEPTH + 1) + b"\x00", "nested deeper"),
    ],
)
def test_decode_rejects_malformed_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        decode(data)


def test_decode_rejects_every_truncation_of_a_valid_encoding() -> None:
    encoded = canonical({"a": [1, "two", b"three", None], "b": {"c": True}})
    for length in range(len(encoded)):
        with pytest.raises(InvalidInput):
            decode(encoded[:length])


def test_decode_enforces_the_item_limit() -> None:
    encoded = canonical([None] * 100)
    assert decode(encoded, max_items=101) == [None] * 100
    with pytest.raises(InvalidInput, match="more than 100 items"):
        decode(encoded, max_items=100)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(InvalidInput):
        decode("\x00")  # type: ignore[arg-type]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    encoded = canonical(["x", 1])
    assert decode(bytearray(encoded)) == ["x", 1]
    assert decode(memoryview(encoded)) == ["x", 1]


@FUZZ
@given(st.binary(max_size=200))
def test_decode_of_random_bytes_raises_only_invalid_input(data: bytes) -> None:
    try:
        value = decode(data)
    except InvalidInput:
        return
    # Whatever decodes must be the one canonical encoding of its value.
    assert canonical(value) == data


@FUZZ
@given(values, st.data())
def test_decode_of_mutated_encodings_raises_only_invalid_input(
    value: object, data: st.DataObject
) -> None:
    encoded = bytearray(canonical(value))
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[index] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        decoded = decode(bytes(encoded))
    except InvalidInput:
        return
    assert canonical(decoded) == bytes(encoded)


def test_domain_digest_is_sha256_of_the_domain_message() -> None:
    message = domain_message("test", b"a", 1)
    assert message == canonical(["corolla/v1/test", [b"a", 1]])
    assert domain_digest("test", b"a", 1) == hashlib.sha256(message).digest()
    assert len(domain_digest("test")) == 32


def test_domain_digest_separates_domains_and_part_boundaries() -> None:
    digests = {
        domain_digest("a", "bc"),
        domain_digest("a", "b", "c"),
        domain_digest("ab", "c"),
        domain_digest("b", "bc"),
        domain_digest("a", ["bc"]),
        domain_digest("a"),
    }
    assert len(digests) == 6


@pytest.mark.parametrize("domain", ["", None, b"x"])
def test_domain_digest_rejects_a_missing_domain(domain: object) -> None:
    with pytest.raises(InvalidInput):
        domain_digest(domain)  # type: ignore[arg-type]
