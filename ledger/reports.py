"""Checking a client's report of a session (wire form: :mod:`corolla.ledger.api.reports`): the
nodes' (request, receipt) pairs and the verifiers' signed verdicts on them, the only way work
earns points (``POST /v1/reports``).

What does not depend on the ledger's state is checked here (and, by the auditor, on every core):
every pair (:func:`~corolla.ledger.rules.verify_pairs`), and for every attestation

- the verdict is signed by its verifier, asked by the reporting client, under a known profile;
- the recomputation behind it is the verifier's: the client signed the request (the same model,
  span and blocks, at the verdict's first position, over exactly its positions), the verifier
  signed its receipt, bound to that request, and the verdict names that receipt's digest;
- the beacon is the one of the verdict's epoch, signed by the key it names (whether that key is
  the ledger's is checked with the state, :mod:`corolla.ledger.checks`);
- the report holds the node's steps ``[first_step, end_step)`` of that session once each, at the
  verdict's positions, with the verdict's model and span, and the verdict's ``node_chain`` is
  the chain digest of the node's receipt of step ``end_step - 1``: the verdict judged the
  outputs the node signed.

The assignment's seed is re-derived here from the beacon, the node, the session, the span,
``end_step`` and that chain digest. A failure refuses the whole report (400, naming it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from corolla.errors import BadReceipt, InvalidInput, VerificationError
from corolla.ledger.api.checks import default_threshold
from corolla.ledger.api.models import b64decode
from corolla.ledger.api.reports import WireAttestation, parse_attestation
from corolla.ledger.rules import (
    ECHOED_FIELDS,
    SignedPair,
    VerifiedAttestation,
    VerifiedStep,
    verify_pairs,
)
from corolla.verify.assignment import assignment_seed
from corolla.verify.beacon import verify_beacon
from corolla.verify.fast import read_receipt, read_request, signed_digest
from corolla.verify.identity import peer_name_of, verify_signature
from corolla.verify.verdicts import verify_verdict

__all__ = ["ParsedReport", "parse_report", "verify_report"]

Groups = dict[tuple[bytes, bytes, int, int], dict[int, list[VerifiedStep]]]


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
    """Check every signature and binding of a report by ``reporter`` (the envelope's author),
    and that each attestation fits the report's pairs; raises a :class:`VerificationError` or
    :class:`InvalidInput` naming the first pair or attestation that fails. Whether an
    attestation's verifier was the assigned one is decided against the ledger's state:
    :func:`corolla.ledger.checks.check_attestations`."""
    steps = verify_pairs(report.pairs, reporter=reporter)
    groups: Groups = defaultdict(lambda: defaultdict(list))
    for step in steps:
        groups[step.group][step.step].append(step)
    beacons: set[bytes] = set()
    verified = []
    for index, attestation in enumerate(report.attestations):
        try:
            verified.append(_verify_attestation(index, attestation, reporter, groups, beacons))
        except (VerificationError, InvalidInput) as error:
            raise type(error)(f"attestation {index}: {error}") from None
    return steps, verified


def _verify_attestation(
    index: int,
    attestation: WireAttestation,
    reporter: bytes,
    groups: Groups,
    beacons: set[bytes],
) -> VerifiedAttestation:
    verdict, request, receipt, beacon = (
        attestation.verdict,
        attestation.request,
        attestation.receipt,
        attestation.beacon,
    )
    verifier = peer_name_of(verdict.verifier_key)
    verify_verdict(verdict)
    if verdict.client_key != reporter:
        raise BadReceipt(f"verifier {verifier}'s verdict was asked by another client")
    default_threshold(verdict.profile)
    # The recomputation: the client's request, the verifier's receipt, the verdict's digest.
    if request.client_key != reporter:
        raise BadReceipt("the recomputation was asked by another client than the reporter")
    verify_signature(request.client_key, attestation.request_bytes, request.signature)
    if receipt.node_key != verdict.verifier_key:
        raise BadReceipt(f"the recomputation's receipt is not verifier {verifier}'s")
    verify_signature(receipt.node_key, attestation.receipt_bytes, receipt.signature)
    for field in ECHOED_FIELDS:
        if getattr(receipt, field) != getattr(request, field):
            raise BadReceipt(f"verifier {verifier}'s receipt: {field} differs from the request")
    if receipt.request_digest != signed_digest(request, attestation.request_bytes):
        raise BadReceipt(f"verifier {verifier}'s receipt is bound to another request")
    if signed_digest(receipt, attestation.receipt_bytes) != verdict.recomputation_digest:
        raise BadReceipt(
            f"verifier {verifier}'s receipt in the report is not the recomputation its verdict "
            "names"
        )
    positions = verdict.end_position - verdict.first_position
    if (request.model_digest, request.span_digest, request.start, request.end) != (
        verdict.model_digest,
        verdict.span_digest,
        verdict.start,
        verdict.end,
    ):
        raise BadReceipt("the recomputation ran another model, span or blocks than the verdict")
    if (request.position, request.tokens, verdict.recomputed_positions) != (
        verdict.first_position,
        positions,
        positions,
    ):
        raise BadReceipt(
            f"the recomputation is not over the verdict's positions [{verdict.first_position}, "
            f"{verdict.end_position})"
        )
    # The beacon: the verdict's epoch, signed by the key it names (the ledger's: with the state).
    if beacon.epoch != verdict.beacon_epoch:
        raise BadReceipt(
            f"the beacon is of epoch {beacon.epoch}, the verdict's {verdict.beacon_epoch}"
        )
    if beacon.signature not in beacons:
        verify_beacon(beacon, beacon.ledger_key)
        beacons.add(beacon.signature)
    # The node's steps the verdict judged, in this report.
    group = groups.get((verdict.node_key, verdict.session_id, verdict.start, verdict.end), {})
    judged = []
    for number in range(verdict.first_step, verdict.end_step):
        found = group.get(number, [])
        if len(found) != 1:
            what = "lacks" if not found else "holds two receipts of"
            raise BadReceipt(f"the report {what} the node's step {number} the verdict judged")
        judged.append(found[0])
    first, last = judged[0], judged[-1]
    if any((s.model_digest, s.span_digest) != (verdict.model_digest, verdict.span_digest)
           for s in judged):  # fmt: skip
        raise BadReceipt("the node's steps ran another model or span than the verdict names")
    if (first.rect[2], last.rect[3]) != (verdict.first_position, verdict.end_position):
        raise BadReceipt("the verdict's positions are not those of the node's steps")
    if last.chain_digest != verdict.node_chain:
        raise BadReceipt(
            f"the verdict's node chain is not the chain of the node's receipt of step "
            f"{verdict.end_step - 1}: it judged other outputs than the node signed"
        )
    seed = assignment_seed(
        beacon, verdict.node_key, verdict.session_id, verdict.start, verdict.end,
        verdict.end_step, last.chain_digest,
    )  # fmt: skip
    return VerifiedAttestation(
        index=index,
        node_key=verdict.node_key,
        client_key=reporter,
        verifier_key=verdict.verifier_key,
        session_id=verdict.session_id,
        start=verdict.start,
        end=verdict.end,
        first_step=verdict.first_step,
        end_step=verdict.end_step,
        first_position=verdict.first_position,
        end_position=verdict.end_position,
        passed=verdict.passed,
        model_digest=verdict.model_digest,
        profile=verdict.profile,
        seed=seed,
        verdict_digest=verdict.digest(),
        verdict=verdict,
        beacon=beacon,
    )
