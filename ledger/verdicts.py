"""Judging fraud evidence: who is believed, as a pure rule over what the evidence showed.

:mod:`corolla.ledger.evidence` examines a piece of evidence (signatures, digests, tensors,
comparisons, and the referee's own recomputation when the ledger runs one) and returns
:class:`Findings`; :func:`judge` then decides, against the ledger's state, in the write
transaction (and again in every audit):

- **with a referee** (``corolla ledger serve --referee-model DIR``): its recomputation decides.
  Claims that fail the comparison with it are fraud: the node is slashed. Claims that match it
  accuse an honest node: refused.
- **without**: the node is guilty only when two recomputations by distinct verifiers that are
  independent (neither the node nor the client, which the evidence check already enforces) and
  trusted (never slashed, reputation at least ``min_verifier_reputation``) both disagree with
  the claims and agree with each other, and no trusted recomputation agrees with the claims.
  Claims that agree with every recomputation accuse an honest node: refused. Anything else is
  logged as *unjudged*: it convicts nobody.

A verifier whose recomputation disagreed with a referee is not penalised here: its signed
recomputation is itself evidence (a step-0 claim) that anyone can submit against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from corolla.errors import LedgerRefused
from corolla.ledger.rules import Standing
from corolla.verify.encoding import domain_digest
from corolla.verify.identity import peer_name_of

__all__ = [
    "Findings",
    "RefereeFinding",
    "RefereeLike",
    "Verdict",
    "evidence_digest",
    "judge",
]


@dataclass(frozen=True, slots=True)
class RefereeFinding:
    """What the referee's own recomputation of the accused's span showed."""

    status: str
    """``passed`` (the claims are within the profile's tolerance of the referee's output),
    ``failed``, or ``declined`` (the referee cannot judge this evidence: another model, too
    much work)."""
    score: str
    """The comparison's score, as text (empty when declined)."""
    note: str
    """Why the referee declined (empty otherwise)."""


class RefereeLike(Protocol):
    """Recomputes an accused span (the ledger's referee, or an auditor's stand-in)."""

    def review(self, evidence: Any) -> RefereeFinding:
        """The finding on ``evidence`` (a ``FraudEvidence`` that passed ``check_evidence``)."""
        ...


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
