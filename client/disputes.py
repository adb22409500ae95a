"""Disputes: when a check fails, the ledger's referee decides who lied, not the client.

A failed verdict (or a failed head rule) is a disagreement between node N and verifier V. The
client builds a :class:`~corolla.verify.disputes.Dispute` from everything it holds on N's
session: N's signed claims ``[0, k)`` (requests, receipts, inputs, outputs) and every verdict
it holds on them, each with the verifier's recomputation (a verifier that signed *passed* over
bad claims is convicted on the same evidence). It submits it to the ledger and reads the
:class:`Ruling`; the session acts on that alone:

- ``node-lied``: N is banned, and the session rewinds to N's last verified step;
- ``verifier-lied``: the lying verifiers are banned; N's steps count as checked (the referee
  checked them);
- ``cleared``: the referee found neither side lying (N's steps count as checked);
- ``unjudged`` (no ledger, no referee, or the ledger refused or failed): nobody is banned on
  either word; the session stops using N and V, rewinds to N's last verified step, and the
  tokens it cannot check are reported unverified.

A majority of peers never decides anything here: the pool of peers is one the accused can fill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corolla.client.check_ledger import CheckLedger
from corolla.client.node_work import NodeWork
from corolla.errors import CorollaError
from corolla.node.protocol.records import ServerRecord
from corolla.verify.disputes import CheckRecord, Dispute

__all__ = ["MAX_DISPUTE_CHECKS", "DisputeCase", "Ruling", "build_dispute", "judge"]

MAX_DISPUTE_CHECKS = 16
"""Verdicts one dispute carries at most (the dispute format's limit)."""


@dataclass(frozen=True)
class Ruling:
    """What the ledger decided (or that nobody could)."""

    decision: str
    """``node-lied`` | ``verifier-lied`` | ``cleared`` | ``unjudged``."""
    lying_verifiers: tuple[bytes, ...]
    judge: str
    """``referee``, or ``none`` when nobody judged."""
    reason: str

    @property
    def node_lied(self) -> bool:
        return self.decision == "node-lied"


@dataclass(frozen=True, eq=False)
class DisputeCase:
    """One disagreement the client handed to the ledger, and its ruling."""

    work: NodeWork
    steps: int
    """N's claims ``[0, steps)`` are disputed."""
    verifier: ServerRecord
    """The verifier whose check disagreed with N (its failed verdict, or the head rule)."""
    trigger: str
    """Why the client disputes: the verifier's failed verdict, or the head rule's reason."""
    dispute: Dispute
    ruling: Ruling

    @property
    def peer_id(self) -> str:
        return self.work.peer_id


def build_dispute(
    work: NodeWork, steps: int, profile: str, trigger: CheckRecord, held: Sequence[CheckRecord]
) -> Dispute:
    """N's claims ``[0, steps)`` and the verdicts on them: ``trigger`` first, then the others
    ``held`` (each other verifier's first, then the newest), within the format's limit."""
    others = [r for r in held if r is not trigger and r.verdict.end_step <= steps]
    by_others = [r for r in others if r.verdict.verifier_key != trigger.verdict.verifier_key]
    same = [r for r in others if r.verdict.verifier_key == trigger.verdict.verifier_key]
    ordered = [trigger, *reversed(by_others), *reversed(same)]
    return Dispute(profile, tuple(work.claims[:steps]), tuple(ordered[:MAX_DISPUTE_CHECKS]))


async def judge(ledger: CheckLedger | None, dispute: Dispute) -> Ruling:
    """The ledger's ruling on ``dispute`` (``unjudged`` without a ledger, or when it refuses)."""
    if ledger is None:
        return Ruling("unjudged", (), "none", "no ledger: nobody can judge the disagreement")
    try:
        outcome = await ledger.submit_dispute(dispute)
    except CorollaError as error:
        return Ruling("unjudged", (), "none", f"the ledger did not judge it: {error}")
    liars = tuple(outcome.lying_verifiers)
    if not outcome.judged:
        return Ruling("unjudged", (), outcome.judge, outcome.reason)
    if outcome.node_lied:
        decision = "node-lied"
    elif liars:
        decision = "verifier-lied"
    else:
        decision = "cleared"
    return Ruling(decision, liars, outcome.judge, outcome.reason)
