"""Signed step requests and receipts: every forgery, tamper and mismatch is detected."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.errors import BadReceipt, BadSignature, InvalidInput, VerificationError
from corolla.verify.digests import GENESIS_CHAIN, chain_digest, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import (
    Receipt,
    StepRequest,
    make_receipt,
    read_receipts_jsonl,
    sign_request,
    verify_receipt,
    verify_request,
    work_units,
    write_receipts_jsonl,
)

CLIENT = Identity.from_seed(bytes([1]) * 32)
NODE = Identity.from_seed(bytes([2]) * 32)
MALLORY = Identity.from_seed(bytes([3]) * 32)


def _hidden(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # batch, sequence, hidden
    return torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _request(
    step: int = 0, *, ticket: bytes | None = None, client: Identity = CLIENT
) -> StepRequest:
    return sign_request(
        client,
        protocol_version=1,
        model_digest=bytes([10]) * 32,
        span_digest=bytes([11]) * 32,
        start=2,
        end=6,
        session_id=bytes([12]) * 16,
        step=step,
        position=3 * step,
        tokens=3,
        input_digest=tensor_digest(_hidden(100 + step)),
        ticket_digest=ticket,
    )


def _altered(value: object) -> object:
    """Another valid value of the same kind: what a tamperer would write."""
    if isinstance(value, bytes):
        return value[:-1] + bytes([value[-1] ^ 0x01])
    if value is None:
        return bytes([13]) * 32
    assert isinstance(value, int)
    return value + 1


def _session(steps: int) -> list[tuple[StepRequest, torch.Tensor, Receipt, bytes]]:
    """A node-session: (request, output, receipt, previous chain) per step."""
    chain = GENESIS_CHAIN
    history = []
    for step in range(steps):
        request = _request(step)
        output = _hidden(step)
        receipt = make_receipt(NODE, request, tensor_digest(output), chain)
        history.append((request, output, receipt, chain))
        chain = receipt.chain_digest
    return history


def test_a_signed_request_verifies() -> None:
    request = _request(ticket=bytes([9]) * 32)
    assert request.client_key == CLIENT.public_key
    verify_request(request)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(StepRequest)])
def test_tampering_with_any_request_field_breaks_its_signature(field: str) -> None:
    for request in (_request(), _request(ticket=bytes([9]) * 32)):
        tampered = dataclasses.replace(request, **{field: _altered(getattr(request, field))})
        with pytest.raises(BadSignature):
            verify_request(tampered)


def test_an_honest_receipt_verifies_against_request_and_output() -> None:
    request, output = _request(), _hidden(0)
    receipt = make_receipt(NODE, request, tensor_digest(output), GENESIS_CHAIN)
    verify_receipt(
        receipt,
        request=request,
        output=output,
        previous_chain=GENESIS_CHAIN,
        node_key=NODE.public_key,
    )
    verify_receipt(
        receipt, request=request, output_digest=tensor_digest(output), previous_chain=GENESIS_CHAIN
    )
    assert receipt.node_key == NODE.public_key
    assert receipt.request_digest == request.digest()
    assert receipt.chain_digest == chain_digest(
        GENESIS_CHAIN, 0, request.input_digest, tensor_digest(output)
    )


def test_a_bfloat16_output_verifies_and_a_one_bit_change_is_caught() -> None:
    request, output = _request(), _hidden(0, torch.bfloat16)
    receipt = make_receipt(NODE, request, tensor_digest(output), GENESIS_CHAIN)
    verify_receipt(receipt, request=request, output=output, previous_chain=GENESIS_CHAIN)
    changed = output.clone()
    changed.view(torch.int16)[0, 1, 4] ^= 1
    with pytest.raises(BadReceipt, match="another output"):
        verify_receipt(receipt, request=request, output=changed, previous_chain=GENESIS_CHAIN)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Receipt)])
def test_tampering_with_any_receipt_field_is_detected(field: str) -> None:
    request, output = _request(), _hidden(0)
    receipt = make_receipt(NODE, request, tensor_digest(output), GENESIS_CHAIN)
    tampered = dataclasses.replace(receipt, **{field: _altered(getattr(receipt, field))})
    with pytest.raises(BadSignature):
        verify_receipt(tampered, request=request, output=output, previous_chain=GENESIS_CHAIN)


def test_a_receipt_forged_by_another_key_in_the_nodes_name_is_refused() -> None:
    request, output = _request(), _hidden(0)
    forged = make_receipt(MALLORY, request, tensor_digest(output), GENESIS_CHAIN)
    in_nodes_name = dataclasses.replace(forged, node_key=NODE.public_key)
    with pytest.raises(BadSignature):
        verify_receipt(in_nodes_name, request=request, output=output, previous_chain=GENESIS_CHAIN)
    with pytest.raises(BadSignature, match="expected"):
        verify_receipt(
            forged,
            request=request,
            output=output,
            previous_chain=GENESIS_CHAIN,
            node_key=NODE.public_key,
        )


ECHOED = [
    "protocol_version",
    "model_digest",
    "span_digest",
    "start",
    "end",
    "session_id",
    "step",
    "position",
    "tokens",
    "input_digest",
]


@pytest.mark.parametrize("field", ECHOED)
def test_an_authentic_receipt_for_a_different_request_is_a_bad_receipt(field: str) -> None:
    request, output = _request(), _hidden(0)
    other = dataclasses.replace(request, **{field: _altered(getattr(request, field))})
    receipt = make_receipt(NODE, other, tensor_digest(output), GENESIS_CHAIN)
    with pytest.raises(BadReceipt, match=field):
        verify_receipt(receipt, request=request, output=output, previous_chain=GENESIS_CHAIN)


def test_a_receipt_for_another_clients_request_is_a_bad_receipt() -> None:
    output = _hidden(0)
    receipt = make_receipt(NODE, _request(client=MALLORY), tensor_digest(output), GENESIS_CHAIN)
    with pytest.raises(BadReceipt, match="client_key"):
        verify_receipt(receipt, request=_request(), output=output, previous_chain=GENESIS_CHAIN)


def test_a_receipt_bound_to_an_otherwise_identical_request_is_a_bad_receipt() -> None:
    output = _hidden(0)
    ticketed = _request(ticket=bytes([9]) * 32)
    receipt = make_receipt(NODE, ticketed, tensor_digest(output), GENESIS_CHAIN)
    with pytest.raises(BadReceipt, match="another request"):
        verify_receipt(receipt, request=_request(), output=output, previous_chain=GENESIS_CHAIN)


def test_a_wrong_output_tensor_is_detected() -> None:
    request, output = _request(), _hidden(0)
    receipt = make_receipt(NODE, request, tensor_digest(output), GENESIS_CHAIN)
    for wrong in (_hidden(1), output.double(), output.reshape(3, 8), output + 1e-7):
        with pytest.raises(BadReceipt, match="another output"):
            verify_receipt(receipt, request=request, output=wrong, previous_chain=GENESIS_CHAIN)
    with pytest.raises(BadReceipt, match="output digest"):
        verify_receipt(
            receipt,
            request=request,
            output_digest=tensor_digest(_hidden(1)),
            previous_chain=GENESIS_CHAIN,
        )


def test_a_receipt_that_does_not_extend_the_chain_is_detected() -> None:
    history = _session(3)
    for request, output, receipt, previous in history:
        verify_receipt(receipt, request=request, output=output, previous_chain=previous)
    request, output, receipt, previous = history[2]
    with pytest.raises(BadReceipt, match="chain"):
        verify_receipt(receipt, request=request, output=output, previous_chain=GENESIS_CHAIN)
    # A node that forgot (or forged) step 1 cannot produce a step-2 receipt the client accepts.
    forked = make_receipt(NODE, request, tensor_digest(output), history[0][2].chain_digest)
    with pytest.raises(BadReceipt, match="chain"):
        verify_receipt(forked, request=request, output=output, previous_chain=previous)


def test_verify_receipt_needs_the_output_or_its_digest() -> None:
    request, output = _request(), _hidden(0)
    receipt = make_receipt(NODE, request, tensor_digest(output), GENESIS_CHAIN)
    with pytest.raises(InvalidInput):
        verify_receipt(receipt, request=request, previous_chain=GENESIS_CHAIN)


def test_every_verification_failure_is_a_verification_error() -> None:
    assert issubclass(BadReceipt, VerificationError)
    assert issubclass(BadSignature, VerificationError)


def test_work_units_are_block_tokens() -> None:
    request = _request()
    receipt = make_receipt(NODE, request, tensor_digest(_hidden(0)), GENESIS_CHAIN)
    assert work_units(receipt) == 3 * (6 - 2)


@pytest.mark.parametrize("record", ["request", "ticketed request", "receipt"])
def test_records_round_trip_through_json_and_bytes(record: str) -> None:
    request = _request(ticket=bytes([9]) * 32 if record == "ticketed request" else None)
    value: StepRequest | Receipt = request
    if record == "receipt":
        value = make_receipt(NODE, request, tensor_digest(_hidden(0)), GENESIS_CHAIN)
    kind = type(value)
    assert kind.from_dict(json.loads(json.dumps(value.to_dict()))) == value
    assert kind.from_bytes(value.to_bytes()) == value


def test_a_request_encoding_is_not_accepted_as_a_receipt() -> None:
    request = _request()
    with pytest.raises(InvalidInput):
        Receipt.from_bytes(request.to_bytes())
    with pytest.raises(InvalidInput):
        Receipt.from_dict(request.to_dict())


def _broken_dicts() -> list[tuple[str, dict[str, object]]]:
    good = make_receipt(NODE, _request(), tensor_digest(_hidden(0)), GENESIS_CHAIN).to_dict()
    extra = {**good, "bonus": 1}
    missing = {key: value for key, value in good.items() if key != "tokens"}
    cases: list[tuple[str, dict[str, object]]] = [("extra field", extra), ("missing", missing)]
    for field, bad in [
        ("signature", str(good["signature"]).upper()),
        ("signature", str(good["signature"])[:-2]),
        ("signature", str(good["signature"])[:-1]),
        ("signature", " " + str(good["signature"])[1:]),
        ("node_key", bytes.fromhex(str(good["node_key"]))),
        ("node_key", None),
        ("tokens", "3"),
        ("tokens", 3.0),
        ("tokens", 0),
        ("tokens", True),
        ("step", -1),
        ("end", 2),
        ("start", 2**70),
        ("protocol_version", 0),
    ]:
        cases.append((f"{field}={bad!r}"[:40], {**good, field: bad}))
    return cases


@pytest.mark.parametrize(("case", "data"), _broken_dicts(), ids=[c for c, _ in _broken_dicts()])
def test_from_dict_rejects_anything_but_exact_well_formed_fields(
    case: str, data: dict[str, object]
) -> None:
    with pytest.raises(InvalidInput):
        Receipt.from_dict(data)


@pytest.mark.parametrize("data", [None, [], "receipt", 7])
def test_from_dict_rejects_non_objects(data: object) -> None:
    with pytest.raises(InvalidInput):
        StepRequest.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_id", bytes(15)),
        ("model_digest", bytes(33)),
        ("model_digest", bytearray(32)),
        ("tokens", 0),
        ("start", 6),
        ("ticket_digest", bytes(31)),
        ("client_key", None),
    ],
)
def test_records_cannot_be_built_malformed(field: str, value: object) -> None:
    with pytest.raises(InvalidInput):
        dataclasses.replace(_request(), **{field: value})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=800))
def test_from_bytes_of_garbage_raises_only_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        Receipt.from_bytes(data)


def test_receipts_round_trip_through_a_jsonl_file(tmp_path: Path) -> None:
    receipts = [receipt for _, _, receipt, _ in _session(3)]
    path = tmp_path / "receipts.jsonl"
    write_receipts_jsonl(path, receipts)
    assert read_receipts_jsonl(path) == receipts
    assert len(path.read_text().splitlines()) == 3
    write_receipts_jsonl(path, receipts[:1])
    assert read_receipts_jsonl(path) == receipts[:1]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "not a JSON object"),
        ('{"a": 1, "a": 2}', "duplicate"),
        ("[" * 100_000, "not a JSON object"),
        ("[]", "must be an object"),
        ('{"tokens": NaN}', "NaN"),
    ],
)
def test_a_bad_jsonl_line_is_reported_with_its_number(
    tmp_path: Path, line: str, reason: str
) -> None:
    receipts = [receipt for _, _, receipt, _ in _session(1)]
    path = tmp_path / "receipts.jsonl"
    write_receipts_jsonl(path, receipts)
    with path.open("a") as handle:
        handle.write("\n" + line + "\n")
    with pytest.raises(InvalidInput, match=f"receipts.jsonl:3: .*{reason}"):
        read_receipts_jsonl(path)


def test_reading_a_missing_receipts_file_raises_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        read_receipts_jsonl(tmp_path / "absent.jsonl")
