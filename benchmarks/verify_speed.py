"""How fast is the cryptographic layer? Signs, verifies, receipts and tensor digests per second.

Run: ``python benchmarks/verify_speed.py [--seconds 0.5]``. Every figure is measured in this run;
the ratios at the end compare operations measured side by side, so they hold across machines
better than the absolute rates do.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.encoding import decode
from corolla.verify.identity import Identity, verify_signature
from corolla.verify.receipts import (
    Receipt,
    StepRequest,
    make_receipt,
    sign_request,
    verify_receipt,
    verify_request,
)

CLIENT = Identity.from_seed(bytes([1]) * 32)
NODE = Identity.from_seed(bytes([2]) * 32)


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second, timing whole batches until ``seconds`` have passed."""
    operation()  # warm up
    count, batch, elapsed = 0, 1, 0.0
    while elapsed < seconds:
        started = time.perf_counter()
        for _ in range(batch):
            operation()
        elapsed += time.perf_counter() - started
        count += batch
        batch = min(batch * 2, 4096)
    return count / elapsed


def request_for(step: int, hidden: torch.Tensor) -> StepRequest:
    return sign_request(
        CLIENT,
        protocol_version=1,
        model_digest=bytes(32),
        span_digest=bytes(32),
        start=0,
        end=12,
        session_id=bytes(16),
        step=step,
        position=step,
        tokens=hidden.shape[0] * hidden.shape[1],
        input_digest=tensor_digest(hidden),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = parser.parse_args()
    seconds = args.seconds
    torch.set_num_threads(1)

    # batch, sequence, hidden: one decode step of a 4096-wide model in bf16.
    hidden = torch.randn(1, 1, 4096).to(torch.bfloat16)
    output = torch.randn(1, 1, 4096).to(torch.bfloat16)
    # batch, sequence, hidden: a 128-token fp32 prefill (2 MiB).
    prefill = torch.randn(1, 128, 4096)
    big = torch.randn(16 * 1024 * 1024)  # 64 MiB of fp32

    message = bytes(32)
    signature = NODE.sign(message)
    request = request_for(0, hidden)
    output_digest = tensor_digest(output)
    receipt = make_receipt(NODE, request, output_digest, GENESIS_CHAIN)
    receipt_bytes = receipt.to_bytes()

    def receipt_round() -> None:
        made = make_receipt(NODE, request, output_digest, GENESIS_CHAIN)
        verify_receipt(made, request=request, output=output, previous_chain=GENESIS_CHAIN)

    def sign_and_verify() -> None:
        verify_signature(NODE.public_key, message, NODE.sign(message))

    rates = {
        "sign (32-byte message)": rate(lambda: NODE.sign(message), seconds),
        "verify (32-byte message)": rate(
            lambda: verify_signature(NODE.public_key, message, signature), seconds
        ),
        "sign + verify (32-byte message)": rate(sign_and_verify, seconds),
        "sign_request": rate(lambda: request_for(0, hidden), seconds),
        "verify_request": rate(lambda: verify_request(request), seconds),
        "make_receipt": rate(
            lambda: make_receipt(NODE, request, output_digest, GENESIS_CHAIN), seconds
        ),
        "verify_receipt (given output digest)": rate(
            lambda: verify_receipt(
                receipt, request=request, output_digest=output_digest, previous_chain=GENESIS_CHAIN
            ),
            seconds,
        ),
        "make_receipt + verify_receipt (1x1x4096 bf16 output)": rate(receipt_round, seconds),
        "Receipt.to_bytes": rate(receipt.to_bytes, seconds),
        "Receipt.from_bytes": rate(lambda: Receipt.from_bytes(receipt_bytes), seconds),
        "decode (receipt bytes)": rate(lambda: decode(receipt_bytes), seconds),
        "tensor_digest 1x1x4096 bf16": rate(lambda: tensor_digest(output), seconds),
        "tensor_digest 1x128x4096 fp32": rate(lambda: tensor_digest(prefill), seconds),
    }
    big_digests = rate(lambda: tensor_digest(big), seconds)
    big_clones = rate(big.clone, seconds)
    megabytes = big.numel() * big.element_size() / 2**20

    width = max(len(name) for name in rates) + 2
    print(f"{'operation':<{width}}{'per second':>14}{'µs each':>12}")
    for name, per_second in rates.items():
        print(f"{name:<{width}}{per_second:>14,.0f}{1e6 / per_second:>12.1f}")
    print(f"{'tensor_digest 64 MiB fp32 (MiB/s)':<{width}}{big_digests * megabytes:>14,.0f}")
    print(f"{'tensor.clone 64 MiB fp32 (MiB/s)':<{width}}{big_clones * megabytes:>14,.0f}")

    sign_verify = rates["sign + verify (32-byte message)"]
    full = rates["make_receipt + verify_receipt (1x1x4096 bf16 output)"]
    print()
    print("ratios measured in this run:")
    print(f"  receipt make+verify costs {sign_verify / full:.2f}x a bare sign+verify")
    print(f"  digesting a tensor costs {big_clones / big_digests:.2f}x copying it")


if __name__ == "__main__":
    main()
