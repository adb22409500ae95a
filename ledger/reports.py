"""A client's report of a session: the nodes' (request, receipt) pairs and the client's
spot-check attestations, the only way work earns points (``POST /v1/reports``).

Wire form (JSON; records as standard base64 of their canonical ``to_bytes()``)::

    {"pairs": [{"request": B64, "receipt": B64}, ...],
     "attestations": [{"node": HEX32, "session": HEX16, "start": INT, "end": INT,
                       "steps": INT, "passed": BOOL, "score": TEXT,
                       "request": B64, "receipt": B64}, ...]}

An attestation says: steps ``0..steps-1`` of ``node``'s session ``session`` on blocks
``[start, end)`` were compared with a verifier's one-shot recomputation, and ``passed`` or
not (``score``: the comparison's score as text, e.g. ``repr(float)``; the canonical encoding
has no floats). The recomputation is the client's signed request (step 0, position 0, the
same model, span and blocks, ``tokens`` = the summed tokens of the checked steps) and the
verifier's signed receipt for it, chained from the genesis digest. The report's envelope is
signed by the client, which must be the client of every pair and attestation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corolla.errors import BadReceipt, InvalidInput, VerificationError
from corolla.ledger.entries import b64decode, b64encode, from_hex
from corolla.ledger.records import (
    chain_digest,
    check_signature,
    read_receipt,
    read_request,
    signed_digest,
)
from corolla.ledger.rules import (
    ECHOED_FIELDS,
    SignedPair,
    VerifiedAttestation,
    VerifiedStep,
    verify_pairs,
)
from corolla.verify.digests import GENESIS_CHAIN
from corolla.verify.identity import peer_name_of
from corolla.verify.receipts import MAX_BLOCK, SESSION_ID_SIZE, Receipt, StepRequest

__all__ = [
    "Attestation",
    "ParsedReport",
    "parse_report",
    "report_batches",
    "report_body",
    "verify_report",
]

_ATTESTATION_FIELDS = frozenset(
    {"node", "session", "start", "end", "steps", "passed", "score", "request", "receipt"}
)
_SCORE = re.compile(r"(?:inf|nan|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)")
_MAX_SCORE = 32
_MAX_STEPS = 2**31


@dataclass(frozen=True, slots=True)
class Attestation:
    """A client's record of one spot-check of a node-session (what it reports)."""

    node_key: bytes
    session_id: bytes
    start: int
    end: int
    steps: int
    passed: bool
    score: str
    request: StepRequest
    receipt: Receipt

    def __post_init__(self) -> None:
        _check_attestation_fields(
            self.node_key, self.session_id, self.start, self.end, self.steps, self.passed
        )
        _check_score(self.score)
        if not isinstance(self.request, StepRequest) or not isinstance(self.receipt, Receipt):
            raise InvalidInput("an attestation holds a StepRequest and a Receipt")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a report carries."""
        return {
            "node": self.node_key.hex(),
            "session": self.session_id.hex(),
            "start": self.start,
            "end": self.end,
            "steps": self.steps,
            "passed": self.passed,
            "score": self.score,
            "request": b64encode(self.request.to_bytes()),
            "receipt": b64encode(self.receipt.to_bytes()),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Attestation:
        """Parse :meth:`to_dict` output strictly; raises :class:`InvalidInput`."""
        parsed = _parse_attestation(data)
        return cls(
            parsed.node_key,
            parsed.session_id,
            parsed.start,
            parsed.end,
            parsed.steps,
            parsed.passed,
            parsed.score,
            parsed.request,
            parsed.receipt,
        )


@dataclass(frozen=True, slots=True)
class _WireAttestation:
    node_key: bytes
    session_id: bytes
    start: int
    end: int
    steps: int
    passed: bool
    score: str
    request: StepRequest
    request_bytes: bytes
    receipt: Receipt
    receipt_bytes: bytes


@dataclass(frozen=True, slots=True)
class ParsedReport:
    """A report's records, read and shape-checked (signatures not yet checked)."""

    pairs: list[SignedPair]
    attestations: list[_WireAttestation]


def report_body(
    pairs: Sequence[tuple[StepRequest, Receipt]], attestations: Sequence[Attestation]
) -> dict[str, Any]:
    """The JSON body of a report."""
    return {
        "pairs": [
            {"request": b64encode(r.to_bytes()), "receipt": b64encode(c.to_bytes())}
            for r, c in pairs
        ],
        "attestations": [attestation.to_dict() for attestation in attestations],
    }


def report_batches(
    pairs: Sequence[tuple[StepRequest, Receipt]],
    attestations: Sequence[Attestation],
    batch_pairs: int,
) -> list[tuple[list[tuple[StepRequest, Receipt]], list[Attestation]]]:
    """Split a report into reports of about ``batch_pairs`` pairs that keep each node-session
    whole, each with the attestations that check its node-sessions (an attestation of a
    node-session without pairs here goes with the first)."""
    groups: dict[tuple[bytes, bytes, int, int], list[tuple[StepRequest, Receipt]]] = {}
    for request, receipt in pairs:
        key = (receipt.node_key, receipt.session_id, receipt.start, receipt.end)
        groups.setdefault(key, []).append((request, receipt))
    batches: list[tuple[list[tuple[StepRequest, Receipt]], list[Attestation]]] = []
    where: dict[tuple[bytes, bytes, int, int], int] = {}
    for key, group in groups.items():
        if not batches or len(batches[-1][0]) + len(group) > batch_pairs:
            batches.append(([], []))
        batches[-1][0].extend(group)
        where[key] = len(batches) - 1
    for attestation in attestations:
        key = (attestation.node_key, attestation.session_id, attestation.start, attestation.end)
        batches[where.get(key, 0)][1].append(attestation)
    return batches


def parse_report(body: Any, max_pairs: int, max_attestations: int) -> ParsedReport:
    """Read a report body; raises :class:`InvalidInput` naming the first bad item."""
    if not isinstance(body, dict) or set(body) != {"pairs", "attestations"}:
        raise InvalidInput('a report is an object with exactly "pairs" and "attestations"')
    pairs, attestations = body["pairs"], body["attestations"]
    if not isinstance(pairs, list) or not 0 < len(pairs) <= max_pairs:
        raise InvalidInput(f'"pairs" must be a list of 1 to {max_pairs} pairs')
    if not isinstance(attestations, list) or len(attestations) > max_attestations:
        raise InvalidInput(f'"attestations" must be a list of at most {max_attestations}')
    parsed: list[SignedPair] = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict) or len(pair) != 2 or set(pair) != {"request", "receipt"}:
            raise InvalidInput(f'pair {index}: must be an object with "request" and "receipt"')
        try:
            request, request_bytes = read_request(b64decode(pair["request"]))
            receipt, receipt_bytes = read_receipt(b64decode(pair["receipt"]))
        except InvalidInput as error:
            raise InvalidInput(f"pair {index}: {error}") from None
        parsed.append((request, request_bytes, receipt, receipt_bytes))
    wire = []
    for index, item in enumerate(attestations):
        try:
            wire.append(_parse_attestation(item))
        except InvalidInput as error:
            raise InvalidInput(f"attestation {index}: {error}") from None
    return ParsedReport(parsed, wire)


def verify_report(
    report: ParsedReport, reporter: bytes
) -> tuple[list[VerifiedStep], list[VerifiedAttestation]]:
    """Check every signature and binding of a report by ``reporter`` (the envelope's author);
    raises a :class:`VerificationError` naming the first pair or attestation that fails.
    Whether an attestation *counts* depends on the ledger's state: see
    :func:`corolla.ledger.rules.creditable_work`."""
    steps = verify_pairs(report.pairs, reporter=reporter)
    verified = []
    for index, attestation in enumerate(report.attestations):
        try:
            verified.append(_verify_attestation(index, attestation, reporter))
        except VerificationError as error:
            raise type(error)(f"attestation {index}: {error}") from None
    return steps, verified


def _verify_attestation(
    index: int, attestation: _WireAttestation, reporter: bytes
) -> VerifiedAttestation:
    request, receipt = attestation.request, attestation.receipt
    if request.client_key != reporter:
        raise BadReceipt(
            f"the recomputation was asked by {peer_name_of(request.client_key)}, not by the "
            "reporting client"
        )
    if (request.start, request.end) != (attestation.start, attestation.end):
        raise BadReceipt("the recomputation ran other blocks than the checked span")
    if request.step != 0 or request.position != 0:
        raise BadReceipt("a recomputation is step 0, position 0 of its own session")
    check_signature(receipt.node_key, attestation.receipt_bytes, receipt.signature)
    request_digest = signed_digest(request, attestation.request_bytes)
    verifier = peer_name_of(receipt.node_key)
    for field in ECHOED_FIELDS:
        if getattr(receipt, field) != getattr(request, field):
            raise BadReceipt(f"verifier {verifier}'s receipt: {field} differs from the request")
    if receipt.request_digest != request_digest:
        raise BadReceipt(f"verifier {verifier}'s receipt is bound to another request")
    expected = chain_digest(GENESIS_CHAIN, 0, receipt.input_digest, receipt.output_digest)
    if receipt.chain_digest != expected:
        raise BadReceipt(f"verifier {verifier}'s receipt does not start a chain")
    return VerifiedAttestation(
        index=index,
        node_key=attestation.node_key,
        client_key=reporter,
        verifier_key=receipt.node_key,
        session_id=attestation.session_id,
        start=attestation.start,
        end=attestation.end,
        steps=attestation.steps,
        passed=attestation.passed,
        tokens=request.tokens,
        model_digest=request.model_digest,
        span_digest=request.span_digest,
        receipt_digest=signed_digest(receipt, attestation.receipt_bytes),
    )


def _parse_attestation(data: Any) -> _WireAttestation:
    if not isinstance(data, dict) or set(data) != _ATTESTATION_FIELDS:
        raise InvalidInput(f"an attestation has exactly the fields {sorted(_ATTESTATION_FIELDS)}")
    node, session = from_hex(data["node"]), from_hex(data["session"])
    start, end, steps, passed = data["start"], data["end"], data["steps"], data["passed"]
    _check_attestation_fields(node, session, start, end, steps, passed)
    _check_score(data["score"])
    request, request_bytes = read_request(b64decode(data["request"]))
    receipt, receipt_bytes = read_receipt(b64decode(data["receipt"]))
    return _WireAttestation(
        node, session, start, end, steps, passed, data["score"], request, request_bytes,
        receipt, receipt_bytes,
    )  # fmt: skip


def _check_attestation_fields(
    node: Any, session: Any, start: Any, end: Any, steps: Any, passed: Any
) -> None:
    if not isinstance(node, bytes) or len(node) != 32:
        raise InvalidInput("an attestation's node is a 32-byte public key")
    if not isinstance(session, bytes) or len(session) != SESSION_ID_SIZE:
        raise InvalidInput(f"an attestation's session is {SESSION_ID_SIZE} bytes")
    for name, value, low, high in (
        ("start", start, 0, MAX_BLOCK),
        ("end", end, 0, MAX_BLOCK),
        ("steps", steps, 1, _MAX_STEPS),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidInput(f"an attestation's {name} must be an integer in [{low}, {high}]")
    if start >= end:
        raise InvalidInput(f"an attestation's span [{start}, {end}) holds no blocks")
    if not isinstance(passed, bool):
        raise InvalidInput("an attestation's passed must be true or false")


def _check_score(score: Any) -> None:
    if not isinstance(score, str) or len(score) > _MAX_SCORE or not _SCORE.fullmatch(score):
        raise InvalidInput(
            "an attestation's score is a decimal number as text (e.g. '3.2e-06', 'inf')"
        )
