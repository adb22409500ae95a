"""The fast path of the canonical encoding (:mod:`corolla.verify.fast`) gives exactly what the
reference gives: the same bytes or the same class of error for any value of the data model;
for any valid StepRequest or Receipt the same record, signing bytes and digests as
``from_bytes``; and on mutated wire bytes the same refusal or the same record."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_fixtures import random_pair

from corolla.errors import InvalidInput
from corolla.verify import GENESIS_CHAIN, Identity, sign_request
from corolla.verify.digests import chain_digest as reference_chain_digest
from corolla.verify.encoding import INT_MAX, INT_MIN, canonical
from corolla.verify.fast import chain_digest, encode, read_receipt, read_request, signed_digest
from corolla.verify.receipts import MAX_BLOCK, MAX_TOKENS, Receipt, StepRequest

scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)

# Anything a caller might hand the encoder, inside the data model or not: floats, ints past 64
# bits, lone surrogates, non-str keys, tuples, bytearrays, sets.
any_scalars = (
    scalars
    | st.floats(allow_nan=False)
    | st.integers()
    | st.text(st.characters(categories=["Cs", "Ll", "Nd"]), max_size=4)
    | st.binary(max_size=8).map(bytearray)
    | st.frozensets(st.integers(0, 3), max_size=2)
)
any_values = st.recursive(
    any_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 3) | st.binary(max_size=2), inner)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_the_lean_encoder_gives_the_canonical_bytes(value: Any) -> None:
    assert encode(value) == canonical(value)


@settings(max_examples=400, deadline=None)
@given(value=any_values)
def test_the_lean_encoder_gives_the_canonical_bytes_or_the_same_refusal(value: Any) -> None:
    try:
        expected: bytes | None = canonical(value)
    except InvalidInput:
        expected = None
    if expected is None:
        with pytest.raises(InvalidInput):
            encode(value)
    else:
        assert encode(value) == expected


def test_the_lean_encoder_refuses_what_the_canonical_one_refuses() -> None:
    too_deep: list[Any] = []
    for _ in range(40):
        too_deep = [too_deep]
    for bad in (1.5, 2**63, {1: "x"}, "\ud800", too_deep):
        with pytest.raises(InvalidInput):
            canonical(bad)
        with pytest.raises(InvalidInput):
            encode(bad)


def test_the_lean_encoder_agrees_on_the_edges_of_the_model() -> None:
    """What the module once checked on import: every tag, both ends of the int range, a
    non-ASCII string, an empty key and an empty container."""
    sample = {
        "pairs": [{"request": "AAEC", "receipt": "é"}],
        "n": -(2**63),
        "m": 2**63 - 1,
        "b": [True, False, None, b"\x00\xff", ()],
        "": {},
    }
    assert encode(sample) == canonical(sample)


def _record_values(cls: type[StepRequest] | type[Receipt]) -> st.SearchStrategy[dict[str, Any]]:
    """Field values within each field's spec (a non-empty span), optional fields sometimes
    absent."""
    fields = {}
    for field in dataclasses.fields(cls):
        spec = field.metadata["spec"]
        if hasattr(spec, "size"):
            present = st.binary(min_size=spec.size, max_size=spec.size)
            fields[field.name] = present | st.none() if spec.optional else present
        else:
            fields[field.name] = st.integers(spec.low, spec.high)
    fields["start"] = st.integers(0, MAX_BLOCK - 1)
    return st.fixed_dictionaries(fields).map(_nonempty_span)


def _nonempty_span(values: dict[str, Any]) -> dict[str, Any]:
    if values["end"] <= values["start"]:
        values["end"] = values["start"] + 1
    return values


requests = _record_values(StepRequest).map(lambda values: StepRequest(**values))
receipts = _record_values(Receipt).map(lambda values: Receipt(**values))
records = requests | receipts


def _fast_read(record: StepRequest | Receipt) -> Any:
    return read_request if isinstance(record, StepRequest) else read_receipt


@settings(max_examples=300, deadline=None)
@given(record=records)
def test_any_valid_record_reads_back_with_its_signing_bytes_and_digest(
    record: StepRequest | Receipt,
) -> None:
    wire = record.to_bytes()
    found, signing = _fast_read(record)(wire)
    assert found == record and type(found) is type(record)
    assert signing == record.signing_bytes() == type(record).from_bytes(wire).signing_bytes()
    assert signed_digest(found, signing) == record.digest()


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40), st.just(0)),
)


def _mutate(wire: bytes, mutation: tuple[str, Any, int]) -> bytes:
    kind, where, mask = mutation
    if kind == "flip":
        at = where % len(wire)
        return wire[:at] + bytes([wire[at] ^ mask]) + wire[at + 1 :]
    if kind == "truncate":
        return wire[: where % len(wire)]
    return wire + where


@settings(max_examples=500, deadline=None)
@given(record=records, mutation=mutations)
def test_mutated_wire_bytes_give_the_references_refusal_or_its_record(
    record: StepRequest | Receipt, mutation: tuple[str, Any, int]
) -> None:
    data = _mutate(record.to_bytes(), mutation)
    cls = type(record)
    try:
        expected = cls.from_bytes(data)
    except InvalidInput:
        with pytest.raises(InvalidInput):
            _fast_read(record)(data)
        return
    found, signing = _fast_read(record)(data)
    assert found == expected and type(found) is cls
    assert signing == expected.signing_bytes()
    assert signed_digest(found, signing) == expected.digest()


def test_a_flipped_int_inside_the_layout_is_refused_or_read_as_the_reference_reads_it() -> None:
    """Every single-bit flip of a request's wire bytes (each byte of the layout, int fields
    included) is judged as ``from_bytes`` judges it."""
    request = StepRequest(
        protocol_version=1,
        model_digest=bytes(32),
        span_digest=bytes(range(32)),
        start=5,
        end=6,
        session_id=bytes(16),
        step=0,
        position=0,
        tokens=1,
        input_digest=bytes(32),
        client_key=bytes(32),
        ticket_digest=None,
        signature=bytes(64),
    )
    wire = request.to_bytes()
    refused = read = 0
    for at in range(len(wire)):
        for bit in (0x01, 0x80):
            data = wire[:at] + bytes([wire[at] ^ bit]) + wire[at + 1 :]
            try:
                expected = StepRequest.from_bytes(data)
            except InvalidInput:
                with pytest.raises(InvalidInput):
                    read_request(data)
                refused += 1
                continue
            assert read_request(data) == (expected, expected.signing_bytes())
            read += 1
    assert refused and read  # both outcomes were exercised


@settings(max_examples=100, deadline=None)
@given(
    start=st.integers(0, MAX_BLOCK - 1),
    width=st.integers(1, 64),
    step=st.integers(0, INT_MAX),
    position=st.integers(0, INT_MAX),
    tokens=st.integers(1, MAX_TOKENS),
    ticket=st.none() | st.binary(min_size=32, max_size=32),
)
def test_records_read_from_the_wire_equal_the_decoded_ones(
    start: int, width: int, step: int, position: int, tokens: int, ticket: bytes | None
) -> None:
    client, node = Identity.from_seed(bytes(32)), Identity.from_seed(bytes(31) + b"\x01")
    request, receipt = random_pair(
        client,
        node,
        start=start,
        end=min(start + width, MAX_BLOCK),
        step=step,
        position=position,
        tokens=tokens,
        ticket=ticket,
    )
    for record, read in ((request, read_request), (receipt, read_receipt)):
        found, signing = read(record.to_bytes())
        assert found == record and signing == record.signing_bytes()
        assert signed_digest(found, signing) == record.digest()
    assert chain_digest(GENESIS_CHAIN, step, request.input_digest, receipt.output_digest) == (
        reference_chain_digest(GENESIS_CHAIN, step, request.input_digest, receipt.output_digest)
    )


@settings(max_examples=200, deadline=None)
@given(
    previous=st.binary(min_size=32, max_size=32),
    step=st.integers(0, INT_MAX),
    input_digest=st.binary(min_size=32, max_size=32),
    output_digest=st.binary(min_size=32, max_size=32),
)
def test_the_direct_chain_digest_is_the_reference_one(
    previous: bytes, step: int, input_digest: bytes, output_digest: bytes
) -> None:
    assert chain_digest(previous, step, input_digest, output_digest) == reference_chain_digest(
        previous, step, input_digest, output_digest
    )


def test_a_record_out_of_range_on_the_wire_is_refused_with_the_reason() -> None:
    client = Identity.from_seed(bytes(32))
    request = sign_request(
        client,
        protocol_version=1,
        model_digest=bytes(32),
        span_digest=bytes(32),
        start=3,
        end=4,
        session_id=bytes(16),
        step=0,
        position=0,
        tokens=1,
        input_digest=bytes(32),
    )
    wire = request.to_bytes()
    at = wire.index(b"tokens") + len(b"tokens") + 1  # the int's 8 bytes follow its tag
    zero = wire[:at] + bytes(8) + wire[at + 8 :]
    with pytest.raises(InvalidInput, match="tokens=0"):
        read_request(zero)
    empty = request.to_bytes().replace(
        b"\x00\x00\x00\x03end\x03" + (4).to_bytes(8, "big"),
        b"\x00\x00\x00\x03end\x03" + (3).to_bytes(8, "big"),
    )
    with pytest.raises(InvalidInput, match="holds no blocks"):
        read_request(empty)
    with pytest.raises(InvalidInput):
        read_request(wire[:-1])


def test_a_value_that_is_not_bytes_is_refused() -> None:
    for read in (read_request, read_receipt):
        with pytest.raises(InvalidInput, match="must be bytes"):
            read(bytearray(543))  # type: ignore[arg-type]
