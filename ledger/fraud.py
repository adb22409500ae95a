"""Fraud: examining evidence, judging it, and what a verdict does to the log.

- :func:`examine` checks a piece of evidence (every signature, digest and binding through
  :func:`corolla.verify.evidence.check_evidence`; forged, tampered or inconsistent evidence
  raises and convicts nobody), compares the disagreeing recomputations with each other, and asks
  the referee, when there is one, for its own recomputation. What it returns (:class:`Findings`)
  is independent of the ledger's state. It needs torch, imported only when evidence arrives.
- :func:`judge` decides who is believed, as a pure rule over the findings, in the write
  transaction (and again in every audit):

  - **with a referee** (``corolla ledger serve --referee-model DIR``): its recomputation decides.
    Claims that fail the comparison with it are fraud: the node is slashed. Claims that match it
    accuse an honest node: refused.
  - **without**: the node is guilty only when two recomputations by distinct verifiers that are
    independent (neither the node nor the client, which the evidence check already enforces)
    and trusted (never slashed, reputation at least ``min_verifier_reputation``) both disagree
    with the claims and agree with each other, and no trusted recomputation agrees with the
    claims. Claims that agree with every recomputation accuse an honest node: refused. Anything
    else is logged as *unjudged*: it convicts nobody.

- :func:`apply_evidence` and :func:`apply_slash` append the outcome. Every piece of evidence
  that is not refused is logged as a ``fraud_evidence`` entry against the accused (its
  reference: the evidence's digest; its payload: the verdict, who judged, why, the referee's
  finding). A guilty verdict then appends a ``slash`` entry taking the accused's whole balance
  (burned, with the evidence's digest as reference) and a ``reputation_changed`` entry zeroing
  its reputation; the slash marks the account, which earns nothing more (no credit, no
  redemption, no fee) and never counts as a verifier again. An operator's slash (``POST
  /v1/slash``) does the same on the strength of evidence already in the log.

A verifier whose recomputation disagreed with a referee is not penalised here: its signed
recomputation is itself evidence (a step-0 claim) that anyone can submit against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from corolla.errors import InvalidInput, LedgerRefused
from corolla.ledger.api.models import Draft
from corolla.ledger.rules import Standing
from corolla.ledger.state import LedgerState, ensure_account, standing_of
from corolla.verify.encoding import domain_digest
from corolla.verify.identity import peer_name_of
from corolla.verify.referee import RefereeFinding, RefereeLike

__all__ = [
    "Findings",
    "Verdict",
    "apply_evidence",
    "apply_slash",
    "evidence_digest",
    "examine",
    "judge",
    "take_all",
]


@dataclass(frozen=True, slots=True)
class Findings:
    """What checking a piece of evidence showed (independent of the ledger's state)."""

    digest: bytes
    accused: bytes
    client: bytes
    session_id: bytes
    start: int
    end: int
    profile: str
    verifiers: tuple[bytes, ...]
    """The verifier of each recomputation."""
    disagreeing: tuple[int, ...]
    """Recomputations the claims fail to match."""
    agreeing_pairs: tuple[tuple[int, int], ...]
    """Pairs of disagreeing recomputations, by distinct verifiers, that match each other."""
    scores: tuple[str, ...]
    """Each recomputation's comparison score with the claims, as text."""
    referee: RefereeFinding | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The ledger's decision on a piece of evidence."""

    verdict: str
    """``guilty`` (the accused is slashed) or ``unjudged`` (logged, convicts nobody)."""
    judge: str
    """``referee``, ``verifiers`` or ``none``."""
    verifiers: tuple[bytes, ...]
    """The trusted verifiers whose recomputations convicted (judge ``verifiers``)."""
    reason: str


def evidence_digest(data: bytes) -> bytes:
    """The identity of a piece of evidence: a digest of its canonical bytes."""
    return domain_digest("fraud-evidence", hashlib.sha256(data).digest())


def judge(findings: Findings, standing: Standing, min_verifier_reputation: int) -> Verdict:
    """Decide (see the module docstring); raises :class:`LedgerRefused` (409) for evidence
    that accuses an honest node."""
    accused = peer_name_of(findings.accused)
    referee = findings.referee
    if referee is not None and referee.status != "declined":
        if referee.status == "passed":
            raise LedgerRefused(
                f"the accused's outputs match the referee's recomputation (score "
                f"{referee.score} within the {findings.profile} tolerance): node {accused} is "
                "not at fault",
                409,
            )
        return Verdict(
            "guilty",
            "referee",
            (),
            f"node {accused}'s outputs fail the comparison with the referee's recomputation "
            f"(score {referee.score}, profile {findings.profile})",
        )
    if not findings.disagreeing:
        raise LedgerRefused(
            f"the accused's outputs match every recomputation in the evidence: node {accused} "
            "is not at fault",
            409,
        )

    def trusted(index: int) -> bool:
        slashed, reputation = standing(findings.verifiers[index])
        return not slashed and reputation >= min_verifier_reputation

    verdict = _by_verifiers(findings, trusted)
    if referee is not None and verdict.verdict == "unjudged":
        return Verdict("unjudged", "none", (), f"{verdict.reason} (the referee declined: "
                       f"{referee.note})")  # fmt: skip
    return verdict


def _by_verifiers(findings: Findings, trusted: Callable[[int], bool]) -> Verdict:
    accused = peer_name_of(findings.accused)
    agreeing_with_node = [
        index
        for index in range(len(findings.verifiers))
        if index not in findings.disagreeing and trusted(index)
    ]
    if agreeing_with_node:
        verifier = peer_name_of(findings.verifiers[agreeing_with_node[0]])
        return Verdict(
            "unjudged",
            "none",
            (),
            f"trusted verifier {verifier}'s recomputation agrees with the accused: the dispute "
            "needs a referee",
        )
    for first, second in findings.agreeing_pairs:
        if trusted(first) and trusted(second):
            keys = (findings.verifiers[first], findings.verifiers[second])
            return Verdict(
                "guilty",
                "verifiers",
                keys,
                f"two trusted, independent verifiers ({peer_name_of(keys[0])}, "
                f"{peer_name_of(keys[1])}) agree with each other and not with node {accused}",
            )
    trusted_disagreeing = [index for index in findings.disagreeing if trusted(index)]
    if len(trusted_disagreeing) < 2:
        return Verdict(
            "unjudged",
            "none",
            (),
            f"{len(trusted_disagreeing)} trusted, independent verifier(s) disagree with the "
            "accused; a conviction without a referee needs two that agree with each other",
        )
    return Verdict(
        "unjudged",
        "none",
        (),
        "the trusted verifiers that disagree with the accused also disagree with each other",
    )


def examine(data: bytes, referee: RefereeLike | None) -> Findings:
    """Check the evidence in ``data`` (``FraudEvidence.to_bytes()``) and what it shows.

    Raises :class:`~corolla.errors.InvalidInput` for malformed evidence and a
    :class:`~corolla.errors.VerificationError` for evidence that does not check out."""
    from corolla.verify.evidence import FraudEvidence, check_evidence
    from corolla.verify.tolerance import compare

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
