"""Tensor digests (dtype, shape, bytes) and the per-session chain digest."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from corolla.errors import InvalidInput
from corolla.verify.digests import GENESIS_CHAIN, chain_digest, tensor_digest
from corolla.verify.encoding import canonical


def test_tensor_digest_is_sha256_of_the_documented_header_and_bytes() -> None:
    header = canonical(["corolla/v1/tensor", "float32", [2]])
    expected = hashlib.sha256(header + struct.pack("<2f", 1.0, 2.0)).digest()
    assert tensor_digest(torch.tensor([1.0, 2.0])) == expected


def test_equal_values_give_equal_digests_whatever_the_memory_layout() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed_copy = base.t().contiguous().t()  # same values, column-major strides
    assert not transposed_copy.is_contiguous()
    assert tensor_digest(base) == tensor_digest(base.clone())
    assert tensor_digest(base) == tensor_digest(transposed_copy)
    assert tensor_digest(base) == tensor_digest(base.requires_grad_())


def test_a_change_of_dtype_gives_another_digest_even_with_identical_bytes() -> None:
    zeros_fp16 = torch.zeros(4, dtype=torch.float16)
    zeros_bf16 = torch.zeros(4, dtype=torch.bfloat16)
    zeros_int16 = torch.zeros(4, dtype=torch.int16)
    digests = {tensor_digest(zeros_fp16), tensor_digest(zeros_bf16), tensor_digest(zeros_int16)}
    assert len(digests) == 3


def test_a_change_of_shape_gives_another_digest_even_with_identical_bytes() -> None:
    values = torch.arange(6, dtype=torch.float32)
    shapes = [(6,), (2, 3), (3, 2), (1, 6), (6, 1), (1, 2, 3)]
    digests = {tensor_digest(values.reshape(shape)) for shape in shapes}
    assert len(digests) == len(shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_changing_any_single_element_changes_the_digest(dtype: torch.dtype) -> None:
    base = torch.arange(24).reshape(2, 3, 4).to(dtype)
    original = tensor_digest(base)
    for index in range(base.numel()):
        changed = base.clone()
        changed.view(-1)[index] += 1
        assert tensor_digest(changed) != original, f"element {index}"


def test_bfloat16_digest_sees_the_lowest_bit() -> None:
    hidden = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    flipped = hidden.clone()
    as_int = flipped.view(torch.int16)
    as_int[0, 2, 7] ^= 1
    assert tensor_digest(flipped) != tensor_digest(hidden)
    assert len(tensor_digest(hidden)) == 32


def test_negative_zero_and_nan_payloads_are_told_apart_by_their_bytes() -> None:
    assert tensor_digest(torch.tensor([0.0])) != tensor_digest(torch.tensor([-0.0]))
    assert tensor_digest(torch.tensor([float("nan")])) == tensor_digest(
        torch.tensor([float("nan")])
    )


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(3.5),
        torch.zeros(0, 4),
        torch.tensor([True, False]),
        torch.tensor([1 + 2j]),
        torch.tensor([[1 + 1j, 2 - 2j]]).conj(),
    ],
    ids=["scalar", "empty", "bool", "complex", "conj-view"],
)
def test_unusual_dense_tensors_have_digests(tensor: torch.Tensor) -> None:
    assert len(tensor_digest(tensor)) == 32


def test_a_conjugate_view_digests_as_its_values() -> None:
    values = torch.tensor([1 + 2j, 3 - 4j])
    assert tensor_digest(values.conj()) == tensor_digest(values.conj().resolve_conj())


@pytest.mark.parametrize(
    "value",
    [
        [1.0, 2.0],
        b"bytes",
        torch.zeros(2, 2).to_sparse(),
        torch.empty(3, device="meta"),
    ],
    ids=["list", "bytes", "sparse", "meta"],
)
def test_tensor_digest_rejects_what_is_not_a_dense_tensor(value: object) -> None:
    with pytest.raises(InvalidInput):
        tensor_digest(value)  # type: ignore[arg-type]


def test_genesis_chain_is_32_zero_bytes() -> None:
    assert bytes(32) == GENESIS_CHAIN


def test_chain_digest_depends_on_every_argument_and_their_order() -> None:
    a, b = bytes([1]) * 32, bytes([2]) * 32
    base = chain_digest(GENESIS_CHAIN, 0, a, b)
    variants = [
        chain_digest(GENESIS_CHAIN, 0, a, b),
        chain_digest(a, 0, a, b),
        chain_digest(GENESIS_CHAIN, 1, a, b),
        chain_digest(GENESIS_CHAIN, 0, b, b),
        chain_digest(GENESIS_CHAIN, 0, a, a),
        chain_digest(GENESIS_CHAIN, 0, b, a),
    ]
    assert variants[0] == base
    assert len(set(variants)) == len(variants)


def test_a_chain_pins_every_earlier_step() -> None:
    steps = [(bytes([i]) * 32, bytes([100 + i]) * 32) for i in range(4)]

    def fold(history: list[tuple[bytes, bytes]]) -> bytes:
        chain = GENESIS_CHAIN
        for step, (inp, out) in enumerate(history):
            chain = chain_digest(chain, step, inp, out)
        return chain

    tampered = list(steps)
    tampered[1] = (steps[1][0], bytes(32))
    assert fold(steps) != fold(tampered)


@pytest.mark.parametrize(
    ("previous", "step", "inp", "out"),
    [
        (bytes(31), 0, bytes(32), bytes(32)),
        (bytes(32), -1, bytes(32), bytes(32)),
        (bytes(32), True, bytes(32), bytes(32)),
        (bytes(32), 0, "00" * 32, bytes(32)),
        (bytes(32), 0, bytes(32), bytearray(32)),
    ],
)
def test_chain_digest_rejects_malformed_arguments(
    previous: object, step: object, inp: object, out: object
) -> None:
    with pytest.raises(InvalidInput):
        chain_digest(previous, step, inp, out)  # type: ignore[arg-type]
