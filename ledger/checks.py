"""What makes a verified attestation count, against the ledger's state (checks v2).

:mod:`corolla.ledger.reports` checked each attestation's signatures and that it fits the
report's pairs, and re-derived its assignment seed. Here, in the write transaction (and in every
audit's replay), each must also pass, or the whole report is refused (409, naming it):

- its beacon is this ledger's (its key, origin and epoch length) for an epoch that had begun;
- its verdict is consistent (:func:`corolla.verify.verdicts.consistent`) with the threshold the
  ledger holds for the model and profile: the latest calibration published before the beacon's
  epoch began (``POST /v1/calibrations``), else the profile's default;
- its verifier is within reach of the assignment (:func:`corolla.verify.assignment.within_reach`)
  over the verifiers whose serving declarations of the span (model, blocks, profile) were
  logged before the beacon's epoch began and not withdrawn before then, leaving out the checked
  node and the client, trusted meaning never slashed and with at least
  ``min_verifier_reputation``.

Taking the calibration and the declarations as they stood when the epoch began makes the
answer the same whenever the report arrives, and the same for every auditor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from corolla.errors import LedgerRefused
from corolla.ledger.api.checks import Serving, default_threshold
from corolla.ledger.rules import VerifiedAttestation
from corolla.ledger.state import LedgerState, standing_of
from corolla.verify.assignment import within_reach
from corolla.verify.identity import peer_name_of
from corolla.verify.verdicts import consistent, parse_score

__all__ = ["check_attestations", "threshold_for"]


def threshold_for(state: LedgerState, model: bytes, profile: str, before: int) -> float:
    """The threshold the ledger holds a verdict on ``model`` under ``profile`` to: the latest
    calibration published before ``before`` (ms), else the profile's default."""
    calibration = state.calibration(model, profile, before)
    return default_threshold(profile) if calibration is None else calibration.threshold


def check_attestations(
    attestations: Sequence[VerifiedAttestation], state: LedgerState, time: int
) -> None:
    """Refuse (:class:`LedgerRefused`) the report if any attestation does not count (see the
    module docstring). Reads the state as it was before the report."""
    for attestation in attestations:
        try:
            _check(attestation, state, time)
        except LedgerRefused as error:
            raise LedgerRefused(
                f"attestation {attestation.index}: {error}", error.status_code
            ) from None


def _check(attestation: VerifiedAttestation, state: LedgerState, time: int) -> None:
    beacon, verdict = attestation.beacon, attestation.verdict
    rules = state.rules
    if (beacon.ledger_key, beacon.origin, beacon.period) != (
        state.ledger_key,
        state.origin,
        rules.beacon_period_s,
    ):
        raise LedgerRefused(
            f"the beacon of epoch {beacon.epoch} is not this ledger's (signed by "
            f"{peer_name_of(beacon.ledger_key)} for {beacon.origin!r}, every {beacon.period} s)",
            400,
        )
    began = beacon.starts_at * 1000
    if began > time:
        raise LedgerRefused(f"the beacon's epoch {beacon.epoch} has not begun", 400)
    threshold = threshold_for(state, attestation.model_digest, attestation.profile, began)
    if not consistent(verdict, threshold):
        named = parse_score(verdict.threshold, "threshold")
        if not math.isclose(named, threshold, rel_tol=1e-9, abs_tol=0.0):
            raise LedgerRefused(
                f"the verdict applied threshold {verdict.threshold}; the ledger's for this model "
                f"under {attestation.profile} is {threshold!r}",
                409,
            )
        said = "passed" if verdict.passed else "failed"
        raise LedgerRefused(
            f"the verdict says {said}, but its score {verdict.score} under the threshold "
            f"{threshold!r} says otherwise",
            409,
        )
    serving = Serving(attestation.model_digest, attestation.start, attestation.end,
                      attestation.profile)  # fmt: skip
    candidates = state.servers(serving, began)
    verifier = attestation.verifier_key
    name = peer_name_of(verifier)
    if verifier not in candidates:
        raise LedgerRefused(
            f"verifier {name} had not declared serving blocks [{serving.start}, {serving.end}) "
            f"of this model under {serving.profile} before epoch {beacon.epoch} began: it could "
            "not be assigned",
            409,
        )
    standing = standing_of(state)
    minimum = rules.min_verifier_reputation

    def trusted(key: bytes) -> bool:
        slashed, reputation = standing(key)
        return not slashed and reputation >= minimum

    if not trusted(verifier):
        slashed, reputation = standing(verifier)
        why = "was slashed" if slashed else f"has reputation {reputation}, below {minimum}"
        raise LedgerRefused(f"verifier {name} {why}: it is not trusted to check", 409)
    excluded = (attestation.node_key, attestation.client_key)
    reach = within_reach(attestation.seed, candidates, excluded, trusted)
    if verifier not in reach:
        assigned = ", ".join(peer_name_of(key) for key in reach) or "nobody"
        raise LedgerRefused(
            f"verifier {name} is not within reach of the assignment of epoch {beacon.epoch} "
            f"(the assigned verifiers: {assigned})",
            409,
        )
