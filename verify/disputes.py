"""A dispute: a node's signed claims and the verdicts on them, for a referee to decide.

When a check fails (or the client's head rule does), the client hands the ledger everything it
holds on that node's session, and the ledger's referee, which hosts the model, decides who lied.
A dispute is self-contained and re-checkable offline by anyone who has the model:

- **claims**: steps ``0..k-1`` of the node's session, each the client-signed request, the
  node-signed receipt, the input and the output the node returned. Receipts pin the tensors by
  digest and chain the steps, so nobody, the client included, can alter what the node said.
- **checks**: every verdict the client holds on those steps, each with the verifier's
  recomputation (the client's request and the verifier's receipt for it, and its output over
  the verdict's token positions).

:func:`check_dispute` checks every signature, digest, binding and shape before any tensor
math (inconsistent disputes are refused, not crashed on). :func:`judge_dispute` decides, given
the referee's own recomputation of the whole prefix:

- the **node** lied if its claims fail the comparison with the referee's recomputation under the
  threshold, or, where the span ends at the model's last block and the referee's head is given,
  if a claimed position picks another token than the referee's and scores above the honest
  floor (steering under the threshold);
- a **verifier** lied if its recomputation fails the comparison with the referee's, or if its
  verdict does not follow from comparing the claims with its own signed recomputation (it
  signed *passed* over outputs it computed differently, or *failed* over outputs that match).

A majority of peers never decides anything here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from corolla.errors import BadReceipt, InvalidInput, VerificationError
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.encoding import canonical, decode
from corolla.verify.evidence import MAX_EVIDENCE_BYTES, StepClaim, pack_tensor, unpack_tensor
from corolla.verify.receipts import Receipt, StepRequest, verify_receipt, verify_request
from corolla.verify.tolerance import compare, token_errors
from corolla.verify.verdicts import CheckVerdict, verify_verdict

__all__ = [
    "DISPUTE_FORMAT",
    "CheckRecord",
    "Dispute",
    "Judgment",
    "check_dispute",
    "judge_dispute",
]

DISPUTE_FORMAT = "corolla-dispute-v1"
_MAX_STEPS = 4096
_MAX_CHECKS = 16


@dataclass(frozen=True)
class CheckRecord:
    """One verdict with the recomputation behind it."""

    verdict: CheckVerdict
    request: StepRequest  # the client's request to the verifier
    receipt: Receipt  # the verifier's receipt for it
    output: torch.Tensor  # batch, the verdict's positions, hidden


@dataclass(frozen=True)
class Dispute:
    profile: str
    claims: tuple[StepClaim, ...]
    checks: tuple[CheckRecord, ...]

    @property
    def accused(self) -> bytes:
        return self.claims[0].receipt.node_key

    @property
    def client(self) -> bytes:
        return self.claims[0].request.client_key

    @property
    def prefix(self) -> torch.Tensor:
        """Every input the node received, as one [batch, tokens, hidden]."""
        return torch.cat([claim.input for claim in self.claims], dim=1)

    @property
    def claimed(self) -> torch.Tensor:
        return torch.cat([claim.output for claim in self.claims], dim=1)

    def to_bytes(self) -> bytes:
        return canonical(
            {
                "format": DISPUTE_FORMAT,
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
                "checks": [
                    [
                        c.verdict.to_value(),
                        c.request.to_bytes(),
                        c.receipt.to_bytes(),
                        pack_tensor(c.output),
                    ]
                    for c in self.checks
                ],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Dispute:
        """Parse strictly; raises only :class:`InvalidInput`."""
        if not isinstance(data, bytes) or len(data) > MAX_EVIDENCE_BYTES:
            raise InvalidInput(f"a dispute must be at most {MAX_EVIDENCE_BYTES} bytes")
        value = decode(data, max_items=16 * _MAX_STEPS)
        if not isinstance(value, dict) or value.get("format") != DISPUTE_FORMAT:
            raise InvalidInput(f"not a {DISPUTE_FORMAT} dispute")
        if set(value) != {"format", "profile", "claims", "checks"}:
            raise InvalidInput("a dispute holds exactly format, profile, claims, checks")
        claims, checks, profile = value["claims"], value["checks"], value["profile"]
        if not isinstance(profile, str):
            raise InvalidInput("a dispute's profile is a string")
        if not isinstance(claims, list) or not 1 <= len(claims) <= _MAX_STEPS:
            raise InvalidInput(f"a dispute holds 1..{_MAX_STEPS} claimed steps")
        if not isinstance(checks, list) or not 1 <= len(checks) <= _MAX_CHECKS:
            raise InvalidInput(f"a dispute holds 1..{_MAX_CHECKS} checks")
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
        parsed_checks = []
        for item in checks:
            _expect_list(item, 4, "a check")
            parsed_checks.append(
                CheckRecord(
                    CheckVerdict.from_value(item[0]),
                    StepRequest.from_bytes(_as_bytes(item[1])),
                    Receipt.from_bytes(_as_bytes(item[2])),
                    unpack_tensor(item[3]),
                )
            )
        return cls(profile, tuple(parsed_claims), tuple(parsed_checks))


@dataclass(frozen=True)
class Judgment:
    """The referee's decision on a dispute."""

    node_lied: bool
    node_reason: str
    node_score: float
    lying_verifiers: tuple[tuple[bytes, str], ...]
    """(verifier key, why) for every verifier whose recomputation or verdict was false."""


Head = Callable[[torch.Tensor], torch.Tensor]
"""hidden [..., hidden] -> token ids [...]: the model's final norm, LM head and argmax."""


def check_dispute(dispute: Dispute) -> None:
    """Every signature, digest, binding and shape; raises :class:`VerificationError` or
    :class:`InvalidInput` for a dispute that is not sound (it then accuses nobody)."""
    claims = dispute.claims
    first = claims[0].request
    batch, _, hidden = claims[0].input.shape
    chain, position, chains, positions = GENESIS_CHAIN, 0, [GENESIS_CHAIN], [0]
    for index, claim in enumerate(claims):
        request, receipt = claim.request, claim.receipt
        shape = claim.input.shape
        if shape[0] != batch or shape[2] != hidden or claim.output.shape != shape:
            raise InvalidInput(f"claim {index}'s tensors do not fit [{batch}, tokens, {hidden}]")
        if shape[0] * shape[1] != request.tokens:
            raise InvalidInput(f"claim {index}'s tensors do not hold its request's tokens")
        verify_request(request)
        same = (request.session_id, request.start, request.end, request.client_key)
        if same != (first.session_id, first.start, first.end, first.client_key):
            raise BadReceipt(f"claim {index} belongs to another session, span or client")
        if (request.span_digest, request.model_digest) != (first.span_digest, first.model_digest):
            raise BadReceipt(f"claim {index} names another model or span digest")
        if request.step != index or request.position != position:
            raise BadReceipt(f"claim {index} is not the session's step {index} (no gaps allowed)")
        if tensor_digest(claim.input) != request.input_digest:
            raise BadReceipt(f"claim {index}'s input tensor is not the one its request names")
        verify_receipt(
            receipt, request=request, output=claim.output, previous_chain=chain,
            node_key=dispute.accused,
        )  # fmt: skip
        chain, position = receipt.chain_digest, position + request.tokens
        chains.append(chain)
        positions.append(position)
    for index, check in enumerate(dispute.checks):
        _check_record(dispute, index, check, chains, positions, batch, hidden)


def _check_record(
    dispute: Dispute,
    index: int,
    check: CheckRecord,
    chains: list[bytes],
    positions: list[int],
    batch: int,
    hidden: int,
) -> None:
    verdict, request, receipt = check.verdict, check.request, check.receipt
    first = dispute.claims[0].request
    verify_verdict(verdict)
    if verdict.node_key != dispute.accused or verdict.client_key != dispute.client:
        raise BadReceipt(f"check {index} judges another node or was asked by another client")
    if verdict.verifier_key in (dispute.accused, dispute.client):
        raise VerificationError(f"check {index} is by the accused or the client")
    if (verdict.session_id, verdict.start, verdict.end) != (
        first.session_id,
        first.start,
        first.end,
    ):
        raise BadReceipt(f"check {index} judges another session or span")
    if (verdict.model_digest, verdict.span_digest) != (first.model_digest, first.span_digest):
        raise BadReceipt(f"check {index} names another model or span digest")
    if verdict.profile != dispute.profile:
        raise BadReceipt(f"check {index} compared under profile {verdict.profile}")
    if verdict.end_step > len(dispute.claims):
        raise BadReceipt(f"check {index} judges steps the dispute does not hold")
    if verdict.node_chain != chains[verdict.end_step]:
        raise BadReceipt(f"check {index} judged other outputs than the node's signed ones")
    span_positions = (positions[verdict.first_step], positions[verdict.end_step])
    if (verdict.first_position, verdict.end_position) != span_positions:
        raise BadReceipt(f"check {index}'s positions are not its steps'")
    expected = (batch, (verdict.end_position - verdict.first_position) // batch, hidden)
    if tuple(check.output.shape) != expected:
        raise InvalidInput(f"check {index}'s recomputation is not {list(expected)}")
    verify_request(request)
    if request.client_key != dispute.client or receipt.node_key != verdict.verifier_key:
        raise BadReceipt(f"check {index}'s recomputation is not the verdict's")
    if (request.start, request.end, request.model_digest, request.span_digest) != (
        first.start,
        first.end,
        first.model_digest,
        first.span_digest,
    ):
        raise BadReceipt(f"check {index}'s recomputation ran other blocks or another model")
    inputs = dispute.prefix[:, _window(verdict, batch)]
    if request.input_digest != tensor_digest(inputs.contiguous()):
        raise BadReceipt(f"check {index}'s recomputation did not run the node's inputs")
    if receipt.digest() != verdict.recomputation_digest:
        raise BadReceipt(f"check {index}'s verdict names another recomputation")
    verify_receipt(
        receipt, request=request, output=check.output, previous_chain=None,
        node_key=verdict.verifier_key,
    )  # fmt: skip


def judge_dispute(
    dispute: Dispute,
    reference: torch.Tensor,
    threshold: float,
    honest_floor: float,
    head: Head | None = None,
) -> Judgment:
    """Decide a dispute that passed :func:`check_dispute`, given the referee's own output over
    the whole prefix (``reference``: [batch, all tokens, hidden]) and the threshold and honest
    floor of the profile for this model. ``head`` is given when the span ends at the model's
    last block (the head rule)."""
    claimed = dispute.claimed
    if reference.shape != claimed.shape:
        raise InvalidInput(f"the referee's output {tuple(reference.shape)} is not the claims'")
    node = compare(claimed, reference, dispute.profile, threshold)
    node_lied, reason = not node.passed, node.describe()
    if node.passed and head is not None:
        steered = _steered(claimed, reference, head, honest_floor)
        if steered:
            node_lied = True
            reason = (
                f"{steered} position(s) pick another token than the referee's with a score "
                f"above the honest floor {honest_floor:.3g} (steering under the threshold)"
            )
    liars = []
    for check in dispute.checks:
        verdict = check.verdict
        window = _window(verdict, claimed.shape[0])
        theirs = compare(check.output, reference[:, window], dispute.profile, threshold)
        if not theirs.passed:
            liars.append((verdict.verifier_key, f"its recomputation is false: {theirs.describe()}"))
            continue
        own = compare(claimed[:, window], check.output, dispute.profile, threshold)
        if own.passed != verdict.passed:
            said = "passed" if verdict.passed else "failed"
            liars.append(
                (
                    verdict.verifier_key,
                    f"it signed '{said}' but its own recomputation gives {own.describe()}",
                )
            )
    return Judgment(node_lied, reason, node.score, tuple(liars))


def _window(verdict: CheckVerdict, batch: int) -> slice:
    """The verdict's positions as a slice of the sequence axis (positions count batch x tokens,
    like a request's)."""
    return slice(verdict.first_position // batch, verdict.end_position // batch)


def _steered(claimed: torch.Tensor, reference: torch.Tensor, head: Head, floor: float) -> int:
    """Positions where the claims pick another token than the reference, scoring above floor."""
    scores = token_errors(claimed, reference)  # batch, tokens
    differ = head(claimed) != head(reference)
    return int((differ & (scores > floor)).sum())


def _as_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidInput("expected bytes in a dispute")
    return value


def _expect_list(value: object, length: int, what: str) -> None:
    if not isinstance(value, list) or len(value) != length:
        raise InvalidInput(f"{what} in a dispute is a list of {length} items")
