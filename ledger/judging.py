"""What fraud evidence and slashes do to the log (the state-dependent half of judging; the rule
itself is :func:`corolla.ledger.verdicts.judge`).

Every piece of evidence that is not refused is logged as a ``fraud_evidence`` entry against the
accused (its reference: the evidence's digest; its payload: the verdict, who judged, why, the
referee's finding). A guilty verdict then appends a ``slash`` entry taking the accused's whole
balance (burned, with the evidence's digest as reference) and a ``reputation_changed`` entry
zeroing its reputation; the slash marks the account, which earns nothing more (no credit, no
redemption, no fee) and never counts as a verifier again. An operator's slash (``POST
/v1/slash``) does the same on the strength of evidence already in the log, e.g. evidence that
was logged unjudged.
"""

from __future__ import annotations

from typing import Any

from corolla.errors import LedgerRefused
from corolla.ledger.entries import Draft
from corolla.ledger.state import LedgerState, ensure_account, standing_of
from corolla.ledger.verdicts import Findings, judge
from corolla.verify.identity import peer_name_of

__all__ = ["apply_evidence", "apply_slash", "take_all"]


def apply_evidence(
    findings: Findings, state: LedgerState, seqs: list[int], extra: dict[str, Any]
) -> None:
    """Judge examined evidence against ``state`` and log the verdict (see the module
    docstring); raises :class:`LedgerRefused` for evidence already logged, against a node
    already slashed, or against an honest node."""
    accused = findings.accused
    logged = state.evidence(findings.digest)
    if logged is not None:
        raise LedgerRefused(f"this evidence is already in the log (entry {logged})", 409)
    account = state.account(accused)
    if account is not None and account.slashed:
        raise LedgerRefused(f"node {peer_name_of(accused)} is already slashed", 409)
    verdict = judge(findings, standing_of(state), state.rules.min_verifier_reputation)
    referee = findings.referee
    guilty = verdict.verdict == "guilty"
    if guilty:
        seqs.extend(ensure_account(state, accused))
    payload = {
        "verdict": verdict.verdict,
        "judge": verdict.judge,
        "reason": verdict.reason,
        "verifiers": list(verdict.verifiers),
        "referee": "none" if referee is None else referee.status,
        "referee_score": "" if referee is None else referee.score,
        "referee_note": "" if referee is None else referee.note,
        "client": findings.client,
        "session": findings.session_id,
        "blocks": [findings.start, findings.end],
        "profile": findings.profile,
    }
    seqs.append(state.append(Draft("fraud_evidence", accused, 0, findings.digest, payload)))
    extra.update(
        verdict=verdict.verdict,
        judge=verdict.judge,
        reason=verdict.reason,
        accused=accused.hex(),
        evidence_digest=findings.digest.hex(),
        taken=0,
    )
    if guilty:
        reason = f"fraud proven by evidence {findings.digest.hex()[:16]}: {verdict.reason}"
        extra["taken"] = take_all(state, accused, findings.digest, reason, seqs)


def apply_slash(
    author: bytes, body: Any, state: LedgerState, seqs: list[int], extra: dict[str, Any]
) -> None:
    """The operator's slash: ``body`` is ``{"account", "reason", "evidence"}`` (checked)."""
    if author != state.ledger_key:
        raise LedgerRefused("only the ledger operator (the ledger's own key) may slash", 403)
    target = bytes.fromhex(body["account"])
    account = state.account(target)
    if account is None:
        raise LedgerRefused(f"no account {peer_name_of(target)}", 404)
    if account.slashed:
        raise LedgerRefused(f"account {peer_name_of(target)} is already slashed", 409)
    evidence = bytes.fromhex(body["evidence"])
    if state.evidence(evidence) is None:
        raise LedgerRefused("a slash must name fraud evidence in the log (its digest)", 409)
    extra["taken"] = take_all(state, target, evidence, body["reason"], seqs)


def take_all(
    state: LedgerState, target: bytes, evidence: bytes, reason: str, seqs: list[int]
) -> int:
    """Slash ``target``: burn its balance, zero its reputation, bar it from earning again.
    Returns the points taken."""
    account = state.account(target)
    if account is None:
        raise LedgerRefused(f"no account {peer_name_of(target)}", 404)
    seqs.append(
        state.append(Draft("slash", target, -account.balance, evidence, {"reason": reason}))
    )
    if account.reputation:
        change = Draft("reputation_changed", target, -account.reputation, b"", {"reason": "slash"})
        seqs.append(state.append(change))
    return account.balance
