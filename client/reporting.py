"""At the end of a session the client tells the ledger what work was done and who checked it.

Work earns points only where a verdict counts (``docs/checks-protocol.md``): signed by the
verifier the ledger's beacon assigned, consistent with its own score and the model's threshold,
and backed by the verifier's receipt for its recomputation. So the client reports every
(request, receipt) pair with the attestations of its checks: each verifier's signed verdict, the
client's request to the verifier and the verifier's receipt, and the beacon that assigned it.
Checks the client drew itself (no ledger) attest nothing. Disputes are not reported here: they
went to the ledger when they arose, and its referee judged them then.

The ledger refuses a whole report over one attestation that does not count (e.g. a verifier
slashed since, or one outside the assignment's reach as the ledger sees it), naming it; the
client then drops that attestation, notes why, and reports the rest (the work it alone covered
earns nothing, the rest is still credited).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corolla.client.session_log import WorkRecord
from corolla.client.spotcheck import CheckOutcome
from corolla.errors import LedgerRefused
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.reports import Attestation, report_batches

__all__ = ["ReportSummary", "attestations_of", "report_session"]


@dataclass
class ReportSummary:
    pairs: int = 0
    attestations: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    """The ledger's answer per report batch (what it credited, which verdicts counted)."""
    dropped: list[str] = field(default_factory=list)
    """Attestations the ledger would not count, and why (the rest was reported without them)."""


_REFUSED = re.compile(r"^attestation (\d+): ")


def attestations_of(checks: Sequence[CheckOutcome]) -> list[Attestation]:
    """One attestation per verdict of a check the ledger's beacon assigned (passed or failed:
    the ledger decides what each is worth)."""
    attestations = []
    for check in checks:
        if check.beacon is None:
            continue  # the client's own draw: it protected the text, it credits nothing
        for record in check.records:
            attestations.append(
                Attestation(record.verdict, record.request, record.receipt, check.beacon)
            )
    return attestations


def report_session(
    ledger: LedgerClient, work: Sequence[WorkRecord], checks: Sequence[CheckOutcome]
) -> ReportSummary:
    """Report a session's pairs with the attestations of its checks to the ledger."""
    summary = ReportSummary()
    if not work:
        return summary
    pairs = [(record.request, record.receipt) for record in work]
    attestations = attestations_of(checks)
    size = ledger.client.config.batch_pairs
    for batch, attested in report_batches(pairs, attestations, size):
        while True:
            try:
                summary.results += ledger.submit_report(batch, attested)
                break
            except LedgerRefused as error:
                match = _REFUSED.match(str(error))
                if match is None or not 0 <= int(match.group(1)) < len(attested):
                    raise
                dropped = attested.pop(int(match.group(1)))
                summary.dropped.append(f"{dropped.verdict.digest().hex()[:16]}: {error}")
        summary.pairs += len(batch)
        summary.attestations += len(attested)
    return summary
