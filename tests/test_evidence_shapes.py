"""Evidence whose every signature is genuine but whose tensors do not fit together is refused
with InvalidInput before any tensor math (the ledger answered 500 for it: issue 15)."""

from __future__ import annotations

import secrets

import pytest
import torch

from corolla.errors import InvalidInput
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.evidence import FraudEvidence, Recomputation, StepClaim, check_evidence
from corolla.verify.identity import Identity
from corolla.verify.receipts import make_receipt, sign_request

CLIENT, NODE, VERIFIER = Identity.generate(), Identity.generate(), Identity.generate()
MODEL, SPAN = bytes(32), b"\x01" * 32


def _request(step: int, position: int, x: torch.Tensor, session: bytes) -> object:
    return sign_request(
        CLIENT,
        protocol_version=1,
        model_digest=MODEL,
        span_digest=SPAN,
        start=0,
        end=2,
        session_id=session,
        step=step,
        position=position,
        tokens=x.shape[0] * x.shape[1],
        input_digest=tensor_digest(x),
    )


def _evidence(inputs: list[torch.Tensor], recomputed_shape: tuple[int, ...] | None) -> bytes:
    session, chain, position, claims = secrets.token_bytes(16), GENESIS_CHAIN, 0, []
    for step, x in enumerate(inputs):
        request = _request(step, position, x, session)
        y = x * 2  # the node's output, signed as it is
        receipt = make_receipt(NODE, request, tensor_digest(y), chain)
        claims.append(StepClaim(request, receipt, x, y))
        chain, position = receipt.chain_digest, position + request.tokens
    batch, hidden = inputs[0].shape[0], inputs[0].shape[2]
    shape = recomputed_shape or (batch, sum(x.shape[1] for x in inputs), hidden)
    output = torch.zeros(shape)
    prefix = torch.zeros(batch, shape[1], hidden)
    request = _request(0, 0, prefix, secrets.token_bytes(16))
    receipt = make_receipt(VERIFIER, request, tensor_digest(output), GENESIS_CHAIN)
    evidence = FraudEvidence("fp32", tuple(claims), (Recomputation(request, receipt, output),))
    return evidence.to_bytes()


@pytest.mark.parametrize(
    ("inputs", "recomputed"),
    [
        ([torch.randn(1, 2, 8), torch.randn(1, 1, 16)], None),  # hidden size changes
        ([torch.randn(1, 2, 8), torch.randn(2, 1, 8)], None),  # batch changes
        ([torch.randn(1, 2, 8), torch.randn(1, 1, 8)], (1, 5, 8)),  # recomputation too long
        ([torch.randn(1, 2, 8)], (1, 2, 4)),  # recomputation of another width
    ],
)
def test_signed_but_inconsistent_evidence_is_invalid_input(inputs, recomputed):
    evidence = FraudEvidence.from_bytes(_evidence(inputs, recomputed))
    with pytest.raises(InvalidInput):
        check_evidence(evidence)
