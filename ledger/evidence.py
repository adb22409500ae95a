"""Examining fraud evidence for the ledger: parse it, check it, compare it (torch-heavy, so
:mod:`corolla.ledger.operations` imports this module only when evidence arrives).

:func:`examine` runs :func:`corolla.verify.evidence.check_evidence` (every signature, digest and
binding; forged, tampered or inconsistent evidence raises and convicts nobody), compares the
disagreeing recomputations with each other, and asks the referee, when there is one, for its
own recomputation. What it returns is independent of the ledger's state;
:func:`corolla.ledger.verdicts.judge` decides.
"""

from __future__ import annotations

from itertools import combinations

from corolla.errors import InvalidInput
from corolla.ledger.verdicts import Findings, RefereeLike, evidence_digest
from corolla.verify.evidence import FraudEvidence, check_evidence
from corolla.verify.tolerance import compare

__all__ = ["examine"]


def examine(data: bytes, referee: RefereeLike | None) -> Findings:
    """Check the evidence in ``data`` (``FraudEvidence.to_bytes()``) and what it shows.

    Raises :class:`~corolla.errors.InvalidInput` for malformed evidence and a
    :class:`~corolla.errors.VerificationError` for evidence that does not check out."""
    evidence = FraudEvidence.from_bytes(data)
    check = check_evidence(evidence)
    profile = evidence.profile
    recomputations = evidence.recomputations
    verifiers = tuple(r.receipt.node_key for r in recomputations)
    agreeing = []
    for first, second in combinations(check.disagreeing, 2):
        if verifiers[first] == verifiers[second]:
            continue
        outputs = (recomputations[first].output, recomputations[second].output)
        try:
            if compare(outputs[0], outputs[1], profile).passed:
                agreeing.append((first, second))
        except InvalidInput:
            continue  # shapes differ: these two do not agree
    claim = evidence.claims[0].request
    return Findings(
        digest=evidence_digest(data),
        accused=check.accused,
        client=check.client,
        session_id=claim.session_id,
        start=claim.start,
        end=claim.end,
        profile=profile,
        verifiers=verifiers,
        disagreeing=tuple(check.disagreeing),
        agreeing_pairs=tuple(agreeing),
        scores=tuple(repr(comparison.score) for comparison in check.comparisons),
        referee=None if referee is None else referee.review(evidence),
    )
