"""Fraud evidence: what a client hands the ledger to prove a node returned wrong activations.

Evidence is self-contained and re-checkable offline by anyone who has the model:

- **claims**: consecutive steps 0..k of the accused node's session, each the client-signed
  request, the node-signed receipt, the input tensor and the output the node returned. The
  receipts pin each tensor by digest and chain the steps, so nobody (the client included) can
  alter what the node said.
- **recomputations**: one or more one-shot forwards of the same blocks over the concatenated
  inputs of those steps, each signed by the verifier that computed it.

:func:`check_evidence` checks every signature, digest and binding, and compares the claims
with each recomputation under the profile's measured tolerance. It says which recomputations
disagree with the node; deciding whom to believe (a referee's own recomputation, or
independent verifiers that agree) is the ledger's rule, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corolla.errors import BadReceipt, InvalidInput, VerificationError
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.encoding import canonical, decode
from corolla.verify.receipts import Receipt, StepRequest, verify_receipt, verify_request
from corolla.verify.tolerance import Comparison, compare

__all__ = [
    "EVIDENCE_FORMAT",
    "MAX_EVIDENCE_BYTES",
    "EvidenceCheck",
    "FraudEvidence",
    "Recomputation",
    "StepClaim",
    "check_evidence",
    "pack_tensor",
    "split_steps",
    "unpack_tensor",
]

EVIDENCE_FORMAT = "corolla-evidence-v1"
MAX_EVIDENCE_BYTES = 64 * 1024 * 1024
_DTYPES = {"float32": torch.float32}
_MAX_STEPS = 4096


@dataclass(frozen=True)
class StepClaim:
    request: StepRequest
    receipt: Receipt
    input: torch.Tensor  # batch, tokens, hidden
    output: torch.Tensor  # batch, tokens, hidden: what the node returned


@dataclass(frozen=True)
class Recomputation:
    request: StepRequest  # position 0, over the concatenated claim inputs
    receipt: Receipt  # signed by the verifier
    output: torch.Tensor  # batch, all tokens, hidden


@dataclass(frozen=True)
class FraudEvidence:
    profile: str  # compute profile of the accused (see verify.tolerance)
    claims: tuple[StepClaim, ...]
    recomputations: tuple[Recomputation, ...]

    @property
    def accused(self) -> bytes:
        return self.claims[0].receipt.node_key

    @property
    def prefix(self) -> torch.Tensor:
        """Every input the accused received, as one [batch, tokens, hidden]."""
        return torch.cat([claim.input for claim in self.claims], dim=1)

    @property
    def claimed(self) -> torch.Tensor:
        return torch.cat([claim.output for claim in self.claims], dim=1)

    def to_bytes(self) -> bytes:
        return canonical(
            {
                "format": EVIDENCE_FORMAT,
                "profile": self.profile,
                "claims": [
                    [
                        c.request.to_bytes(),
                        c.receipt.to_bytes(),
                        pack_tensor(c.input),
                        pack_tensor(c.output),
                    ]
                    for c in self.claims
                ],
                "recomputations": [
                    [r.request.to_bytes(), r.receipt.to_bytes(), pack_tensor(r.output)]
                    for r in self.recomputations
                ],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> FraudEvidence:
        """Parse strictly; raises only InvalidInput."""
        if not isinstance(data, bytes) or len(data) > MAX_EVIDENCE_BYTES:
            raise InvalidInput(f"evidence must be at most {MAX_EVIDENCE_BYTES} bytes")
        value = decode(data, max_items=16 * _MAX_STEPS)
        if not isinstance(value, dict) or value.get("format") != EVIDENCE_FORMAT:
            raise InvalidInput(f"not {EVIDENCE_FORMAT} evidence")
        if set(value) != {"format", "profile", "claims", "recomputations"}:
            raise InvalidInput("evidence holds exactly format, profile, claims, recomputations")
        claims, recomputations = value["claims"], value["recomputations"]
        if not isinstance(claims, list) or not 1 <= len(claims) <= _MAX_STEPS:
            raise InvalidInput(f"evidence needs 1..{_MAX_STEPS} claimed steps")
        if not isinstance(recomputations, list) or not 1 <= len(recomputations) <= 8:
            raise InvalidInput("evidence needs 1..8 recomputations")
        if not isinstance(value["profile"], str):
            raise InvalidInput("the profile must be a string")
        parsed_claims = []
        for item in claims:
            _expect_list(item, 4, "a claim")
            parsed_claims.append(
                StepClaim(
                    StepRequest.from_bytes(_as_bytes(item[0])),
                    Receipt.from_bytes(_as_bytes(item[1])),
                    unpack_tensor(item[2]),
                    unpack_tensor(item[3]),
                )
            )
        parsed_recomputations = []
        for item in recomputations:
            _expect_list(item, 3, "a recomputation")
            parsed_recomputations.append(
                Recomputation(
                    StepRequest.from_bytes(_as_bytes(item[0])),
                    Receipt.from_bytes(_as_bytes(item[1])),
                    unpack_tensor(item[2]),
                )
            )
        return cls(value["profile"], tuple(parsed_claims), tuple(parsed_recomputations))


@dataclass(frozen=True)
class EvidenceCheck:
    """What the evidence proves: the accused, and each recomputation's comparison."""

    accused: bytes
    client: bytes
    comparisons: tuple[Comparison, ...]  # one per recomputation, claims vs recomputed

    @property
    def disagreeing(self) -> tuple[int, ...]:
        """Indices of the recomputations that the node's claims do not match."""
        return tuple(i for i, c in enumerate(self.comparisons) if not c.passed)


def split_steps(recomputed: torch.Tensor, claims: tuple[StepClaim, ...]) -> list[torch.Tensor]:
    """Cut a recomputation [batch, all tokens, hidden] into the claims' step outputs."""
    sizes = [claim.input.shape[1] for claim in claims]
    return list(torch.split(recomputed, sizes, dim=1))


def check_evidence(evidence: FraudEvidence) -> EvidenceCheck:
    """Check signatures, digests and bindings; compare claims with each recomputation.

    Raises VerificationError or InvalidInput when the evidence itself is not sound (forged,
    tampered, inconsistent): such evidence accuses nobody.
    """
    claims = evidence.claims
    first = claims[0].request
    _check_shapes(evidence)
    chain = GENESIS_CHAIN
    position = 0
    for index, claim in enumerate(claims):
        request, receipt = claim.request, claim.receipt
        verify_request(request)
        if (request.session_id, request.start, request.end) != (
            first.session_id,
            first.start,
            first.end,
        ):
            raise BadReceipt(f"claim {index} belongs to another session or span")
        if request.client_key != first.client_key or request.span_digest != first.span_digest:
            raise BadReceipt(f"claim {index} names another client or span digest")
        if request.step != index or request.position != position:
            raise BadReceipt(f"claim {index} is not the session's step {index} (no gaps allowed)")
        if tensor_digest(claim.input) != request.input_digest:
            raise BadReceipt(f"claim {index}'s input tensor is not the one the request names")
        verify_receipt(
            receipt,
            request=request,
            output=claim.output,
            previous_chain=chain,
            node_key=evidence.accused,
        )
        if claim.output.shape != claim.input.shape:
            raise InvalidInput(f"claim {index}'s output and input shapes differ")
        chain, position = receipt.chain_digest, position + request.tokens
    prefix, claimed = evidence.prefix, evidence.claimed
    comparisons = []
    for index, recomputation in enumerate(evidence.recomputations):
        request, receipt = recomputation.request, recomputation.receipt
        verify_request(request)
        if receipt.node_key in (evidence.accused, first.client_key):
            raise VerificationError(
                f"recomputation {index} is by the accused or the client: not independent"
            )
        if (request.start, request.end, request.span_digest, request.model_digest) != (
            first.start,
            first.end,
            first.span_digest,
            first.model_digest,
        ):
            raise BadReceipt(f"recomputation {index} ran other blocks or another model")
        if request.position != 0 or request.input_digest != tensor_digest(prefix):
            raise BadReceipt(f"recomputation {index} did not run the claims' inputs")
        verify_receipt(
            receipt,
            request=request,
            output=recomputation.output,
            previous_chain=GENESIS_CHAIN,
            node_key=receipt.node_key,
        )
        if recomputation.output.shape != claimed.shape:
            raise InvalidInput(f"recomputation {index} has the wrong shape")
        comparisons.append(compare(claimed, recomputation.output, evidence.profile))
    return EvidenceCheck(evidence.accused, first.client_key, tuple(comparisons))


def _check_shapes(evidence: FraudEvidence) -> None:
    """Every tensor fits the others before any tensor math: claims share batch and hidden size,
    each step's tensors hold the tokens its request names, and each recomputation covers them
    all (a validly signed but inconsistent piece of evidence is refused, not a crash)."""
    batch, _, hidden = evidence.claims[0].input.shape
    total = 0
    for index, claim in enumerate(evidence.claims):
        shape = claim.input.shape
        if shape[0] != batch or shape[2] != hidden:
            raise InvalidInput(
                f"claim {index}'s input is {tuple(shape)}, but the session's steps are "
                f"[{batch}, tokens, {hidden}]"
            )
        if claim.output.shape != shape:
            raise InvalidInput(f"claim {index}'s output and input shapes differ")
        if shape[0] * shape[1] != claim.request.tokens:
            raise InvalidInput(
                f"claim {index}'s tensors hold {shape[0] * shape[1]} tokens, its request "
                f"{claim.request.tokens}"
            )
        total += shape[1]
    for index, recomputation in enumerate(evidence.recomputations):
        if tuple(recomputation.output.shape) != (batch, total, hidden):
            raise InvalidInput(
                f"recomputation {index} is {tuple(recomputation.output.shape)}, the claims "
                f"[{batch}, {total}, {hidden}]"
            )


def pack_tensor(tensor: torch.Tensor) -> dict[str, object]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise InvalidInput(f"evidence tensors must be one of {sorted(_DTYPES)}, not {dtype}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return {
        "dtype": dtype,
        "shape": list(tensor.shape),
        "data": flat.view(torch.uint8).numpy().tobytes(),
    }


def unpack_tensor(value: object) -> torch.Tensor:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise InvalidInput("an evidence tensor holds exactly dtype, shape and data")
    dtype = _DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    shape, data = value["shape"], value["data"]
    if dtype is None:
        raise InvalidInput(f"evidence tensors must be one of {sorted(_DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(d, int) and 1 <= d <= 2**24 for d in shape)
    ):
        raise InvalidInput("an evidence tensor is [batch, tokens, hidden] with positive sizes")
    element = torch.tensor([], dtype=dtype).element_size()
    if not isinstance(data, bytes) or len(data) != shape[0] * shape[1] * shape[2] * element:
        raise InvalidInput("an evidence tensor's data does not match its shape")
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _as_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidInput("expected bytes in evidence")
    return value


def _expect_list(value: object, length: int, what: str) -> None:
    if not isinstance(value, list) or len(value) != length:
        raise InvalidInput(f"{what} in evidence is a list of {length} items")
