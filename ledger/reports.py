"""Checking a client's report of a session (wire form: :mod:`corolla.ledger.api.reports`): the
nodes' (request, receipt) pairs and the client's spot-check attestations, the only way work
earns points (``POST /v1/reports``).

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

from dataclasses import dataclass
from typing import Any

from corolla.errors import BadReceipt, InvalidInput, VerificationError
from corolla.ledger.api.models import b64decode
from corolla.ledger.api.reports import WireAttestation, parse_attestation
from corolla.ledger.rules import (
    ECHOED_FIELDS,
    SignedPair,
    VerifiedAttestation,
    VerifiedStep,
    verify_pairs,
)
from corolla.verify.digests import GENESIS_CHAIN
from corolla.verify.fast import chain_digest, read_receipt, read_request, signed_digest
from corolla.verify.identity import peer_name_of, verify_signature

__all__ = ["ParsedReport", "parse_report", "verify_report"]


@dataclass(frozen=True, slots=True)
class ParsedReport:
    """A report's records, read and shape-checked (signatures not yet checked)."""

    pairs: list[SignedPair]
    attestations: list[WireAttestation]


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
            wire.append(parse_attestation(item))
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
    index: int, attestation: WireAttestation, reporter: bytes
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
    verify_signature(receipt.node_key, attestation.receipt_bytes, receipt.signature)
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
