"""The ledger's fast paths give exactly what the reference encoders give: the lean canonical
encoder, records read from their wire form (with their signing bytes and digests), and leaf
hashes computed from stored payload bytes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_fixtures import random_pair

from corolla.errors import InvalidInput
from corolla.ledger.api.models import Entry
from corolla.ledger.entries import raw_leaf_hash
from corolla.verify import GENESIS_CHAIN, Identity, sign_request
from corolla.verify.digests import chain_digest as reference_chain_digest
from corolla.verify.encoding import INT_MAX, INT_MIN, canonical
from corolla.verify.fast_encoding import encode
from corolla.verify.fast_records import chain_digest, read_receipt, read_request, signed_digest
from corolla.verify.receipts import MAX_BLOCK, MAX_TOKENS

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


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_the_lean_encoder_gives_the_canonical_bytes(value: Any) -> None:
    assert encode(value) == canonical(value)


def test_the_lean_encoder_refuses_what_the_canonical_one_refuses() -> None:
    too_deep: list[Any] = []
    for _ in range(40):
        too_deep = [too_deep]
    for bad in (1.5, 2**63, {1: "x"}, "\ud800", too_deep):
        with pytest.raises(InvalidInput):
            canonical(bad)
        with pytest.raises(InvalidInput):
            encode(bad)


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


@settings(max_examples=100, deadline=None)
@given(payload=values, seq=st.integers(0, INT_MAX), amount=st.integers(INT_MIN, INT_MAX))
def test_leaf_hashes_from_stored_payload_bytes_equal_the_entries_own(
    payload: Any, seq: int, amount: int
) -> None:
    entry = Entry(
        seq=seq,
        kind="work_credited",
        account=bytes(32),
        amount=amount,
        ref=b"\x01" * 32,
        payload=payload,
        op=7,
        op_digest=b"\x02" * 32,
        author=b"\x03" * 32,
        author_signature=b"\x04" * 64,
        time=1_800_000_000_000,
    )
    assert raw_leaf_hash(entry.raw()) == entry.leaf_hash()
    other = dataclasses.replace(entry, kind="verifier_fee")
    assert raw_leaf_hash(other.raw()) != entry.leaf_hash()
