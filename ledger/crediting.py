"""What a report (or a referee's judgment) appends: credit for checked work, fees for checking.

- :func:`apply_report`: refuses the report unless every attestation counts
  (:func:`corolla.ledger.checks.check_attestations`), then credits each pair that
  :func:`corolla.ledger.rules.creditable_work` allows (only the pieces no earlier credit covered)
  and pays each verifier for the positions it newly checked.
- :func:`credit_step`: one ``work_credited`` entry (and the node's reputation, the first time
  it earns in a client session), shared with disputes the referee found the node honest in.

**Fees grow with the work**: a counted verdict pays its verifier ``new positions x blocks x
credit_per_block_token x verifier_fee_permille / 1000`` (rounded down), where the new positions
are those of the verdict's ``[first_position, end_position)`` that this verifier was not paid
for in this client session before (the ``paid`` rectangles, like credited ones). A later check
of a longer session by the same verifier is paid only for what it added, so checking costs a
fixed fraction of the served work at any session length. A fee rounded down to nothing appends
nothing (and those positions stay unpaid).
"""

from __future__ import annotations

from typing import Any

from corolla.errors import LedgerRefused
from corolla.ledger.api.models import Draft
from corolla.ledger.checks import check_attestations
from corolla.ledger.rules import (
    VerifiedAttestation,
    VerifiedStep,
    area,
    creditable_work,
    reputation_after_credit,
    uncovered,
)
from corolla.ledger.state import LedgerState, ensure_account, standing_of
from corolla.verify.identity import peer_name_of

__all__ = ["MAX_BALANCE", "apply_report", "check_room", "credit_step"]

MAX_BALANCE = 2**62
"""No account may hold more points (sums stay inside SQLite's 64-bit integers)."""


def apply_report(
    steps: tuple[VerifiedStep, ...],
    attestations: tuple[VerifiedAttestation, ...],
    state: LedgerState,
    time: int,
    seqs: list[int],
    pairs: list[dict[str, Any]],
    extra: dict[str, Any],
) -> None:
    """Append what a verified report earns (see the module docstring)."""
    check_attestations(attestations, state, time)
    credit = creditable_work(steps, attestations, standing_of(state))
    for step in steps:
        attestation = credit.credited.get(step.index)
        if attestation is None:
            reason = credit.refused[step.index]
            pairs.append({"pair": step.index, "credited_units": 0, "reason": reason})
            continue
        units = credit_step(step, {"pair": step.index, "attestation": attestation}, state, seqs)
        pairs.append({"pair": step.index, "credited_units": units})
        if not units:
            pairs[-1]["reason"] = "already credited"
    extra["attestations"] = [_pay(attestation, state, seqs) for attestation in attestations]


def _pay(attestation: VerifiedAttestation, state: LedgerState, seqs: list[int]) -> dict[str, Any]:
    rules = state.rules
    verifier, client, session = (
        attestation.verifier_key,
        attestation.client_key,
        attestation.session_id,
    )
    rect = attestation.rect
    pieces = uncovered(rect, state.paid(verifier, client, session, rect))
    units = sum(area(piece) for piece in pieces)
    fee = units * rules.credit_per_block_token * rules.verifier_fee_permille // 1000
    answer = {"attestation": attestation.index, "counted": True, "fee": fee, "units": units}
    if not fee:
        return answer
    seqs.extend(ensure_account(state, verifier))
    check_room(state, verifier, fee)
    payload = {
        "attestation": attestation.index,
        "node": attestation.node_key,
        "client": client,
        "session": session,
        "pieces": [list(piece) for piece in pieces],
        "units": units,
    }
    draft = Draft("verifier_fee", verifier, fee, attestation.verdict_digest, payload)
    seqs.append(state.append(draft))
    return answer


def credit_step(
    step: VerifiedStep, why: dict[str, Any], state: LedgerState, seqs: list[int]
) -> int:
    """Credit the pieces of ``step`` no earlier credit covered (``why``: what the entry's payload
    says checked it); returns the block-tokens credited."""
    rules = state.rules
    pieces = uncovered(step.rect, state.covered(step.client_key, step.session_id, step.rect))
    units = sum(area(piece) for piece in pieces)
    if not units:
        return 0
    seqs.extend(ensure_account(state, step.node_key))
    check_room(state, step.node_key, units * rules.credit_per_block_token)
    first_in_session = not state.has_earned(step.node_key, step.client_key, step.session_id)
    payload = {
        **why,
        "client": step.client_key,
        "session": step.session_id,
        "pieces": [list(piece) for piece in pieces],
    }
    amount = units * rules.credit_per_block_token
    seqs.append(state.append(Draft("work_credited", step.node_key, amount, step.receipt_digest,
                                   payload)))  # fmt: skip
    account = state.account(step.node_key)
    if first_in_session and account is not None:
        gain = reputation_after_credit(account.reputation, rules.reputation_cap)
        if gain > account.reputation:
            change = Draft(
                "reputation_changed",
                step.node_key,
                gain - account.reputation,
                b"",
                {"reason": "passed a check in a new client session"},
            )
            seqs.append(state.append(change))
    return units


def check_room(state: LedgerState, key: bytes, amount: int) -> None:
    """Refuse (409) an amount that would take ``key``'s balance past :data:`MAX_BALANCE`."""
    account = state.account(key)
    if account is not None and account.balance + amount > MAX_BALANCE:
        raise LedgerRefused(f"account {peer_name_of(key)} cannot hold more points", 409)
