"""Digests of tensors and of a session's chain of steps.

A tensor's digest covers its dtype, its shape and every byte of its values, so the same values
give the same digest and a change of dtype, of shape or of a single element gives another. The
chain digest folds each step of a node-session into the previous one, so the receipt of step
``n`` pins the inputs and outputs of steps ``0..n``: the whole context the node attended to.

Bytes are hashed in the host's native order; every supported host (x86-64, arm64) is
little-endian, so digests agree across machines.
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING

from corolla.errors import InvalidInput
from corolla.verify.encoding import DOMAIN_PREFIX, canonical, domain_digest

if TYPE_CHECKING:
    import torch

__all__ = ["DIGEST_SIZE", "GENESIS_CHAIN", "chain_digest", "check_digest", "tensor_digest"]

DIGEST_SIZE = 32
GENESIS_CHAIN = bytes(DIGEST_SIZE)
"""The chain digest before a session's first step."""

_TENSOR_DOMAIN = DOMAIN_PREFIX + "tensor"


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 (32 bytes) over the dtype name, the shape and the contiguous CPU bytes.

    Works for every dense dtype, bfloat16 and bool included; raises :class:`InvalidInput` for
    anything that is not a dense tensor with materialised values.
    """
    import torch  # lazily: the ledger uses this module without ever touching a tensor

    if not isinstance(tensor, torch.Tensor):
        raise InvalidInput(f"can only digest a torch.Tensor, not {type(tensor).__name__}")
    if tensor.layout is not torch.strided or tensor.is_quantized or tensor.is_meta:
        raise InvalidInput("can only digest a dense tensor with materialised values")
    # The header is canonical, hence prefix-free, and fixes the byte length that follows.
    header = _header(tensor.dtype, tuple(tensor.shape))
    flat = tensor.detach()
    if flat.device.type != "cpu" or flat.is_conj() or flat.is_neg() or not flat.is_contiguous():
        flat = flat.to("cpu").resolve_conj().resolve_neg().contiguous()
    flat = flat.reshape(-1)
    # Viewing as uint8 reinterprets any element type (bf16 has no numpy dtype) without a copy.
    raw = flat.view(torch.uint8).numpy()
    hasher = hashlib.sha256(header)
    hasher.update(raw.data)
    return hasher.digest()


@functools.lru_cache(maxsize=256)
def _header(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    dtype_name = str(dtype).removeprefix("torch.")
    return canonical([_TENSOR_DOMAIN, dtype_name, list(shape)])


def chain_digest(previous: bytes, step: int, input_digest: bytes, output_digest: bytes) -> bytes:
    """Fold one step into a session's chain: domain ``session-chain``; start from GENESIS_CHAIN."""
    check_digest("previous chain digest", previous)
    check_digest("input digest", input_digest)
    check_digest("output digest", output_digest)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidInput(f"step must be a non-negative int, not {step!r}")
    return domain_digest("session-chain", previous, step, input_digest, output_digest)


def check_digest(name: str, value: object) -> bytes:
    """Return ``value`` if it is a 32-byte ``bytes`` digest, else raise :class:`InvalidInput`."""
    if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise InvalidInput(f"{name} must be {DIGEST_SIZE} bytes, got {shown}")
    return value
