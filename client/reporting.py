"""At the end of a session the client tells the ledger what happened.

Work earns points only where a passed spot-check covers it, so the client reports every
(request, receipt) pair together with its spot-check attestations (each carrying the verifier's
signed receipt for its recomputation), and hands the ledger the fraud evidence of every node it
caught. The ledger re-checks all of it; the client's word alone credits nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from corolla.client.session import WorkRecord
from corolla.client.spotcheck import CheckOutcome
from corolla.errors import LedgerError
from corolla.ledger.api.client import EvidenceVerdict, LedgerClient
from corolla.ledger.api.reports import Attestation

__all__ = ["ReportSummary", "attestations_of", "report_session"]


@dataclass
class ReportSummary:
    pairs: int = 0
    attestations: int = 0
    verdicts: list[EvidenceVerdict] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # evidence the ledger turned down, and why


def attestations_of(checks: Sequence[CheckOutcome]) -> list[Attestation]:
    """One attestation per spot-check that reached a verdict, with the deciding recomputation."""
    attestations = []
    for check in checks:
        if check.verdict == "unchecked" or not check.recomputations:
            continue
        # "verifier-lied": the node passed against the third peer, whose recomputation decides.
        recomputation = check.recomputations[-1 if check.verdict == "verifier-lied" else 0]
        attestations.append(
            Attestation(
                node_key=check.node_key,
                session_id=check.session_id,
                start=check.start,
                end=check.end,
                steps=check.steps,
                passed=check.passed,
                score=_score_text(check.score),
                request=recomputation.request,
                receipt=recomputation.receipt,
            )
        )
    return attestations


def report_session(
    ledger: LedgerClient, work: Sequence[WorkRecord], checks: Sequence[CheckOutcome]
) -> ReportSummary:
    """Report a session's pairs and attestations, then its fraud evidence, to the ledger."""
    summary = ReportSummary()
    if work:
        pairs = [(record.request, record.receipt) for record in work]
        attestations = attestations_of(checks)
        ledger.submit_report(pairs, attestations)
        summary.pairs, summary.attestations = len(pairs), len(attestations)
    accused: set[bytes] = set()
    for check in checks:
        if check.evidence is None or check.node_key in accused:
            continue
        accused.add(check.node_key)
        try:
            summary.verdicts.append(ledger.submit_evidence(check.evidence))
        except LedgerError as error:
            summary.refused.append(f"{check.peer_id}: {error}")
    return summary


def _score_text(score: float) -> str:
    if score != score:  # NaN
        return "nan"
    if score == float("inf"):
        return "inf"
    return f"{score:.6e}".replace("e-0", "e-").replace("e+0", "e+")
