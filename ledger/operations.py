"""Operations: what each signed request does to the log, in two phases.

:func:`prepare` checks everything that does not depend on the ledger's state (the author's
signature, the body's shape, every receipt and request signature) and may run in parallel;
:func:`apply` then decides, against the current state and inside the single write
transaction, which entries to append. The ledger runs both on every request; the auditor runs
both again on every logged operation and must get the very same entries.

Refusals raise :class:`~corolla.errors.LedgerRefused` (or :class:`~corolla.errors.InvalidInput`,
:class:`~corolla.errors.VerificationError` for malformed or forged input); a refused
operation appends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corolla.errors import BadSignature, InvalidInput, LedgerRefused
from corolla.ledger.api.checks import Serving
from corolla.ledger.api.envelope import Envelope, verify_envelope
from corolla.ledger.api.models import Draft, b64decode
from corolla.ledger.config import ServiceLimits
from corolla.ledger.crediting import apply_report, check_room
from corolla.ledger.declarations import (
    apply_calibrations,
    apply_serving,
    parse_calibrations,
    parse_serving,
)
from corolla.ledger.disputes import DisputeFindings, apply_dispute
from corolla.ledger.disputes import examine as examine_dispute
from corolla.ledger.fraud import Findings, apply_evidence, apply_slash
from corolla.ledger.reports import parse_report, verify_report
from corolla.ledger.rules import VerifiedAttestation, VerifiedStep, parse_pairs, verify_pairs
from corolla.ledger.state import LedgerState, ensure_account
from corolla.verify.identity import SIGNATURE_SIZE, peer_name_of
from corolla.verify.referee import RefereeLike
from corolla.verify.tickets import Ticket

__all__ = ["Outcome", "Prepared", "apply", "prepare"]

MAX_NAME = 64
MAX_REASON = 500
MAX_SEEDS = 256
_MS = 1000


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request whose signatures and shape were checked, ready to be applied."""

    envelope: Envelope
    body: Any
    steps: tuple[VerifiedStep, ...] = ()
    attestations: tuple[VerifiedAttestation, ...] = ()
    findings: Findings | None = None
    serving: Serving | None = None
    calibrations: tuple[Any, ...] = ()
    """Calibrations to publish (``corolla.verify.tolerance.Calibration``)."""
    dispute: DisputeFindings | None = None


@dataclass(slots=True)
class Outcome:
    """What applying an operation did: the entries it appended, and per-item results."""

    seqs: list[int] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(
    envelope: Envelope,
    body: Any,
    limits: ServiceLimits,
    referee: RefereeLike | None = None,
) -> Prepared:
    """Check the author's signature, the body's shape and, for reports and redemptions, every
    record's signature and binding; examine fraud evidence and disputes (with ``referee``'s
    recomputation when there is one). Independent of the ledger's state."""
    try:
        verify_envelope(envelope)
    except BadSignature:
        raise LedgerRefused(
            f"the request's signature does not verify under its author's key "
            f"{peer_name_of(envelope.author)}",
            401,
        ) from None
    action = envelope.action
    if action == "report":
        report = parse_report(body, limits.max_pairs, limits.max_attestations)
        steps, attestations = verify_report(report, envelope.author)
        return Prepared(envelope, body, tuple(steps), tuple(attestations))
    if action == "redeem":
        steps = verify_pairs(parse_pairs(body, limits.max_pairs), reporter=None)
        return Prepared(envelope, body, tuple(steps))
    if action in ("serving", "serving-withdraw"):
        return Prepared(envelope, body, serving=parse_serving(body))
    if action == "calibrate":
        return Prepared(envelope, body, calibrations=tuple(parse_calibrations(body)))
    _check_body(action, body)
    if action == "dispute":
        # Reading a dispute's tensors loads torch (inside examine_dispute), as evidence does.
        findings = examine_dispute(b64decode(body["dispute"]), envelope.author, referee)
        return Prepared(envelope, body, dispute=findings)
    if action == "evidence":
        # Imported here: examining evidence needs torch, which nothing else in the ledger does.
        from corolla.ledger.fraud import examine

        findings = examine(b64decode(body["evidence"]), referee)
        return Prepared(envelope, body, findings=findings)
    return Prepared(envelope, body)


def apply(prepared: Prepared, state: LedgerState, time: int) -> Outcome:
    """Append the entries ``prepared`` earns against ``state`` at ``time`` (ms)."""
    action = prepared.envelope.action
    if action == "genesis":
        return _genesis(prepared, state)
    outcome = Outcome()
    author = prepared.envelope.author
    if action == "register":
        if state.account(author) is not None:
            raise LedgerRefused(f"account {peer_name_of(author)} is already registered", 409)
        name = prepared.body["name"]
        outcome.seqs.append(
            state.append(Draft("account_registered", author, 0, b"", {"name": name}))
        )
        return outcome
    if action == "report":
        apply_report(
            prepared.steps,
            prepared.attestations,
            state,
            time,
            outcome.seqs,
            outcome.pairs,
            outcome.extra,
        )
    elif action in ("serving", "serving-withdraw") and prepared.serving is not None:
        withdraw = action == "serving-withdraw"
        apply_serving(author, prepared.serving, withdraw, state, time, outcome.seqs)
        outcome.extra["serving"] = prepared.serving.to_body()
    elif action == "calibrate":
        apply_calibrations(author, list(prepared.calibrations), state, time, outcome.seqs)
    elif action == "dispute":
        if prepared.dispute is None:
            raise InvalidInput("a dispute that was not examined")
        apply_dispute(prepared.dispute, state, outcome.seqs, outcome.extra)
    elif action == "redeem":
        _redeem(prepared.steps, state, time, outcome)
    elif action == "buy-ticket":
        _buy_ticket(prepared, state, time, outcome)
    elif action == "evidence":
        if prepared.findings is None:
            raise InvalidInput("evidence that was not examined")
        apply_evidence(prepared.findings, state, outcome.seqs, outcome.extra)
    elif action == "slash":
        apply_slash(prepared.envelope.author, prepared.body, state, outcome.seqs, outcome.extra)
    else:
        raise InvalidInput(f"unknown action {action!r}")
    return outcome


def _genesis(prepared: Prepared, state: LedgerState) -> Outcome:
    if prepared.envelope.author != state.ledger_key:
        raise LedgerRefused("only the ledger itself writes the genesis entry", 403)
    body = prepared.body
    if body.get("rules") != state.rules.to_dict():
        raise InvalidInput("genesis rules differ from the ledger's rules")
    seq = state.append(Draft("genesis", state.ledger_key, 0, b"", body))
    if seq != 0:
        raise LedgerRefused("the log already has a genesis entry", 409)
    outcome = Outcome(seqs=[seq])
    # Seed verifiers start with the reputation a verifier needs: without them, a log whose
    # rules ask verifiers for reputation could never credit anything (reputation comes only
    # from work that trusted verifiers checked).
    for text in body["seed_verifiers"]:
        key = bytes.fromhex(text)
        draft = Draft("account_registered", key, 0, b"", {"name": "seed verifier"})
        outcome.seqs.append(state.append(draft))
        if state.rules.min_verifier_reputation:
            reason = {"reason": "seed verifier named in the genesis entry"}
            draft = Draft(
                "reputation_changed", key, state.rules.min_verifier_reputation, b"", reason
            )
            outcome.seqs.append(state.append(draft))
    return outcome


def _ensure_account(state: LedgerState, key: bytes, outcome: Outcome) -> None:
    outcome.seqs.extend(ensure_account(state, key))


def _redeem(steps: Sequence[VerifiedStep], state: LedgerState, time: int, outcome: Outcome) -> None:
    grace = state.rules.redeem_grace_s * _MS
    reasons = []
    for step in steps:
        reason = None
        ticket_state = None if step.ticket_digest is None else state.ticket(step.ticket_digest)
        node = state.account(step.node_key)
        if step.ticket_digest is None:
            reason = "the request names no ticket"
        elif node is not None and node.slashed:
            reason = "the node was slashed"
        elif ticket_state is None:
            reason = "the ledger sold no such ticket"
        elif ticket_state.ticket.client_key != step.client_key:
            reason = "the ticket belongs to another client"
        elif state.is_redeemed(step.request_digest):
            reason = "this request was already redeemed"
        elif time > ticket_state.ticket.expiry + grace:
            reason = "the ticket expired"
        elif ticket_state.spent + step.units > ticket_state.ticket.budget:
            left = ticket_state.ticket.budget - ticket_state.spent
            reason = f"over the ticket's budget ({left} block-tokens left, {step.units} asked)"
        if reason is not None or ticket_state is None or step.ticket_digest is None:
            reasons.append(f"pair {step.index}: {reason}")
            outcome.pairs.append({"pair": step.index, "redeemed_units": 0, "refused": reason})
            continue
        _ensure_account(state, step.node_key, outcome)
        check_room(state, step.node_key, step.units * ticket_state.ticket.price)
        draft = Draft(
            "ticket_redeemed",
            step.node_key,
            step.units * ticket_state.ticket.price,
            step.request_digest,
            {"pair": step.index, "ticket": step.ticket_digest, "units": step.units},
        )
        outcome.seqs.append(state.append(draft))
        outcome.pairs.append({"pair": step.index, "redeemed_units": step.units})
    if not any(pair["redeemed_units"] for pair in outcome.pairs):
        raise LedgerRefused("nothing to redeem: " + "; ".join(reasons[:3]), 409)


def _buy_ticket(prepared: Prepared, state: LedgerState, time: int, outcome: Outcome) -> None:
    rules = state.rules
    client = prepared.envelope.author
    budget, ttl = prepared.body["budget"], prepared.body["ttl_s"]
    if ttl > rules.ticket_max_ttl_s:
        raise LedgerRefused(f"a ticket lives at most {rules.ticket_max_ttl_s} s", 400)
    cost = budget * rules.ticket_price_per_block_token
    account = state.account(client)
    balance = 0 if account is None else account.balance
    if cost > balance:
        raise LedgerRefused(
            f"insufficient balance: the ticket costs {cost} points, the balance is {balance}", 409
        )
    unsigned = Ticket(
        ledger_key=state.ledger_key,
        client_key=client,
        budget=budget,
        price=rules.ticket_price_per_block_token,
        expiry=time + ttl * _MS,
        serial=prepared.envelope.digest(),
        signature=bytes(SIGNATURE_SIZE),
    )
    ticket = state.sign_ticket(unsigned)
    draft = Draft("ticket_bought", client, -cost, ticket.digest(), {"ticket": ticket.to_value()})
    outcome.seqs.append(state.append(draft))
    outcome.extra["ticket"] = ticket.to_dict()
    outcome.extra["ticket_digest"] = ticket.digest().hex()


def _check_body(action: str, body: Any) -> None:
    """Shape checks for the small bodies (the HTTP layer checks them too; the auditor relies
    on these)."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    if action == "genesis":
        _fields(body, {"origin", "rules", "seed_verifiers"})
        seeds = body["seed_verifiers"]
        if not isinstance(seeds, list) or len(seeds) > MAX_SEEDS or len(set(seeds)) != len(seeds):
            raise InvalidInput(f"seed_verifiers must be a list of at most {MAX_SEEDS} keys")
        for seed in seeds:
            _key(seed, "a seed verifier")
        return
    if action == "register":
        _fields(body, {"name"})
        _text(body["name"], "name", MAX_NAME)
    elif action == "buy-ticket":
        _fields(body, {"budget", "ttl_s"})
        _positive(body["budget"], "budget", 2**40)
        _positive(body["ttl_s"], "ttl_s", 2**31)
    elif action == "evidence":
        _fields(body, {"evidence"})
        if not isinstance(body["evidence"], str):
            raise InvalidInput("evidence is the base64 of FraudEvidence.to_bytes()")
    elif action == "dispute":
        _fields(body, {"dispute"})
        if not isinstance(body["dispute"], str):
            raise InvalidInput("a dispute is the base64 of Dispute.to_bytes()")
    elif action == "slash":
        _fields(body, {"account", "reason", "evidence"})
        _key(body["account"], "account")
        _text(body["reason"], "reason", MAX_REASON)
        _key(body["evidence"], "evidence")
    else:
        raise InvalidInput(f"unknown action {action!r}")


def _fields(body: dict[str, Any], names: set[str]) -> None:
    if set(body) != names:
        raise InvalidInput(f"the body must have exactly the fields {sorted(names)}")


def _text(value: Any, name: str, limit: int) -> None:
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(f"{name} must be a string of at most {limit} characters")


def _positive(value: Any, name: str, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise InvalidInput(f"{name} must be an integer in [1, {limit}]")


def _key(value: Any, name: str) -> None:
    if not isinstance(value, str) or len(value) != 64 or value != value.lower():
        raise InvalidInput(f"{name} must be 64 lowercase hex digits")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise InvalidInput(f"{name} must be 64 lowercase hex digits") from None
