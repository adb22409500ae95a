"""Disputes (checks v2): decided by the ledger's referee, never by a vote (``POST /v1/disputes``).

A dispute (:class:`corolla.verify.disputes.Dispute`) holds a node's signed claims on steps
``0..k-1`` of a session and every verdict the client holds on them, each with the verifier's
signed recomputation. :func:`examine` parses it and checks every signature, digest, binding and
shape (:func:`corolla.verify.disputes.check_dispute`) *before* any tensor math: anything
inconsistent is refused (4xx) and accuses nobody. Then, when the ledger runs a referee that
decides disputes (``judge(dispute)``), it recomputes and returns its
:class:`~corolla.verify.disputes.Judgment`; without one, or when it declines, the dispute is
logged unjudged.

:func:`apply_dispute` logs one ``dispute`` entry against the accused (reference: the dispute's
digest; payload: judged or not, by whom, whether the node lied and why, every lying verifier
and why, the referee's note). A judged dispute then slashes the node if it lied and every
verifier that lied (each once: an account already slashed is left as it is), and, when the node
did not lie, credits its claimed steps that no earlier credit covered: the referee checked them.
An unjudged dispute slashes nobody. The same dispute twice is refused (409).

The submitter must be the client of the claims. A dispute costs the referee a recomputation of
the whole prefix (bounded by its ``max_tokens``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from corolla.errors import CorollaError, LedgerRefused
from corolla.ledger.api.checks import default_threshold
from corolla.ledger.api.models import Draft
from corolla.ledger.crediting import credit_step
from corolla.ledger.fraud import take_all
from corolla.ledger.rules import VerifiedStep
from corolla.ledger.state import LedgerState, ensure_account
from corolla.verify.encoding import domain_digest
from corolla.verify.identity import peer_name_of
from corolla.verify.referee import RefereeFinding, RefereeLike

if TYPE_CHECKING:
    from corolla.verify.disputes import Dispute, Judgment

__all__ = [
    "NO_REFEREE",
    "DisputeFindings",
    "DisputeReferee",
    "apply_dispute",
    "dispute_digest",
    "examine",
]

_log = logging.getLogger("corolla.ledger")

NO_REFEREE = "the ledger runs no referee that decides disputes"


class DisputeReferee(Protocol):
    """A referee that decides disputes (``corolla.node.referee.Referee`` does). Typed here until
    :class:`corolla.verify.referee.RefereeLike` offers ``judge``."""

    def judge(self, dispute: Dispute) -> Judgment | RefereeFinding:
        """The referee's judgment, or a ``declined`` finding saying why it cannot judge."""
        ...


@dataclass(frozen=True, slots=True)
class DisputeFindings:
    """What examining a dispute showed (independent of the ledger's state)."""

    digest: bytes
    accused: bytes
    client: bytes
    session_id: bytes
    start: int
    end: int
    profile: str
    claims: tuple[VerifiedStep, ...]
    """The node's claimed steps (credited when the referee finds the node honest)."""
    judgment: Judgment | None
    """The referee's decision; None when it was not judged."""
    note: str
    """Why it was not judged (empty when it was)."""
    referee: str
    """``judged``, ``declined`` (a referee looked and declined) or ``none``."""


def dispute_digest(data: bytes) -> bytes:
    """The identity of a dispute: a digest of its canonical bytes."""
    return domain_digest("dispute", hashlib.sha256(data).digest())


def examine(data: bytes, author: bytes, referee: RefereeLike | None) -> DisputeFindings:
    """Parse and check the dispute in ``data`` (``Dispute.to_bytes()``) submitted by
    ``author``, then have ``referee`` judge it when it can. Raises
    :class:`~corolla.errors.InvalidInput` or a :class:`~corolla.errors.VerificationError` for a
    dispute that is not sound, :class:`LedgerRefused` (403) when ``author`` is not its client."""
    from corolla.verify.disputes import Dispute, Judgment, check_dispute

    dispute = Dispute.from_bytes(data)
    default_threshold(dispute.profile)  # a known profile, before anything else reads it
    check_dispute(dispute)
    if author != dispute.client:
        raise LedgerRefused("a dispute is submitted by the client of the claims it holds", 403)
    judgment: Judgment | None = None
    note, status = NO_REFEREE, "none"
    judge = getattr(referee, "judge", None)
    if judge is not None:
        decided = _ask(judge, dispute)
        if isinstance(decided, Judgment):
            judgment, note, status = decided, "", "judged"
        else:
            note, status = decided.note or "the referee declined", "declined"
    first = dispute.claims[0].request
    return DisputeFindings(
        digest=dispute_digest(data),
        accused=dispute.accused,
        client=dispute.client,
        session_id=first.session_id,
        start=first.start,
        end=first.end,
        profile=dispute.profile,
        claims=tuple(_step(index, claim) for index, claim in enumerate(dispute.claims)),
        judgment=judgment,
        note=note,
        referee=status,
    )


def _ask(judge: Any, dispute: Dispute) -> Any:
    """The referee's answer; a failure of the referee itself (not of the dispute) declines."""
    try:
        return judge(dispute)
    except CorollaError:
        raise
    except Exception as error:  # the referee's own fault must not become the submitter's 500
        _log.exception("the referee failed on a dispute")
        return RefereeFinding("declined", "", f"the referee failed: {type(error).__name__}")


def _step(index: int, claim: Any) -> VerifiedStep:
    request, receipt = claim.request, claim.receipt
    return VerifiedStep(
        index=index,
        node_key=receipt.node_key,
        client_key=receipt.client_key,
        session_id=receipt.session_id,
        rect=(receipt.start, receipt.end, receipt.position, receipt.position + receipt.tokens),
        request_digest=request.digest(),
        receipt_digest=receipt.digest(),
        ticket_digest=request.ticket_digest,
        step=receipt.step,
        model_digest=receipt.model_digest,
        span_digest=receipt.span_digest,
        chain_digest=receipt.chain_digest,
    )


def apply_dispute(
    findings: DisputeFindings, state: LedgerState, seqs: list[int], extra: dict[str, Any]
) -> None:
    """Log the dispute and what its judgment does (see the module docstring)."""
    logged = state.evidence(findings.digest)
    if logged is not None:
        raise LedgerRefused(f"this dispute is already in the log (entry {logged})", 409)
    judgment = findings.judgment
    accused = findings.accused
    node_lied = judgment is not None and judgment.node_lied
    liars = () if judgment is None else judgment.lying_verifiers
    reason = _reason(findings)
    payload = {
        "judged": judgment is not None,
        "referee": findings.referee,
        "node_lied": node_lied,
        "node_reason": "" if judgment is None else judgment.node_reason,
        "node_score": "" if judgment is None else repr(judgment.node_score),
        "lying_verifiers": [[key, why] for key, why in liars],
        "note": findings.note,
        "client": findings.client,
        "session": findings.session_id,
        "blocks": [findings.start, findings.end],
        "profile": findings.profile,
    }
    seqs.append(state.append(Draft("dispute", accused, 0, findings.digest, payload)))
    short = findings.digest.hex()[:16]
    if node_lied and judgment is not None:
        _slash(state, accused, findings.digest, f"dispute {short}: {judgment.node_reason}", seqs)
    for key, why in liars:
        _slash(state, key, findings.digest, f"dispute {short}: lying verifier: {why}", seqs)
    credited = 0
    account = state.account(accused)
    if judgment is not None and not node_lied and not (account is not None and account.slashed):
        for step in findings.claims:
            why_credit = {"claim": step.index, "dispute": findings.digest}
            credited += credit_step(step, why_credit, state, seqs)
    extra.update(
        judged=judgment is not None,
        node_lied=node_lied,
        lying_verifiers=[key.hex() for key, _ in liars],
        judge="referee" if judgment is not None else "none",
        reason=reason,
        accused=accused.hex(),
        dispute_digest=findings.digest.hex(),
        credited_units=credited,
    )


def _slash(state: LedgerState, key: bytes, digest: bytes, reason: str, seqs: list[int]) -> None:
    seqs.extend(ensure_account(state, key))
    account = state.account(key)
    if account is not None and not account.slashed:
        take_all(state, key, digest, reason[:500], seqs)


def _reason(findings: DisputeFindings) -> str:
    judgment = findings.judgment
    if judgment is None:
        return f"logged unjudged: {findings.note}"
    node = peer_name_of(findings.accused)
    said = [
        f"node {node} {'lied' if judgment.node_lied else 'did not lie'}: {judgment.node_reason}"
    ]
    said += [f"verifier {peer_name_of(key)} lied: {why}" for key, why in judgment.lying_verifiers]
    return "; ".join(said)
