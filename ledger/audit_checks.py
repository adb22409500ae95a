"""The auditor's check of each logged operation, apart from the ledger's state, on every core.

An operation's check (the body's digest, the author's signature, then every record's signature
and binding, through :func:`corolla.ledger.operations.prepare`) does not depend on the ledger's
state, so the auditor runs the big ones (reports and redemptions) in worker processes while it
goes on reading and hashing the log, and takes their results when it replays them in order.
Results come back as plain tuples (cheaper to send between processes than dataclasses).

Fraud evidence and disputes are checked in line (``check_evidence`` or ``check_dispute`` again,
on the stored bytes); the ledger's referee's finding or judgment is taken as logged
(:class:`LoggedReferee`, :class:`LoggedJudge`) unless the auditor has the model, in which case
it is recomputed and must agree.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, fields
from typing import Any

from corolla.errors import CorollaError, InvalidInput, LedgerError, VerificationError
from corolla.ledger.api.envelope import Envelope, body_digest
from corolla.ledger.api.models import parse_json
from corolla.ledger.config import ServiceLimits
from corolla.ledger.entries import RawEntry, RawOperation
from corolla.ledger.operations import Prepared, prepare
from corolla.ledger.rules import VerifiedAttestation, VerifiedStep
from corolla.verify.encoding import decode
from corolla.verify.fast import encode
from corolla.verify.referee import RefereeFinding, RefereeLike

__all__ = [
    "AUDIT_LIMITS",
    "HEAVY",
    "Checked",
    "LoggedJudge",
    "LoggedReferee",
    "OperationChecker",
    "check_operation",
]

AUDIT_LIMITS = ServiceLimits(
    max_body_bytes=1 << 40,
    max_pairs=1 << 30,
    max_attestations=1 << 30,
    max_evidence_body_bytes=1 << 40,
)
"""Service limits are policy, not rules: the auditor accepts whatever the ledger accepted."""
HEAVY = ("report", "redeem")
"""Actions worth checking in another process (many signatures each)."""
_MAX_WORKERS = 8
_STEP_FIELDS = tuple(field.name for field in fields(VerifiedStep))
_ATTESTATION_FIELDS = tuple(field.name for field in fields(VerifiedAttestation))


@dataclass(frozen=True, slots=True)
class Checked:
    """A logged operation's envelope (None when its body is not JSON) and either what it
    prepared or why it does not verify."""

    envelope: Envelope | None
    prepared: Prepared | str


def check_operation(operation: RawOperation, referee: RefereeLike | None = None) -> Checked:
    """Check one operation in this process."""
    _, author, nonce, timestamp, action, body, signature, _ = operation
    try:
        value = parse_json(body)
        envelope = Envelope(author, nonce, timestamp, action, body_digest(encode(value)), signature)
    except CorollaError as error:
        return Checked(None, f"its body cannot be read: {error}")
    try:
        return Checked(envelope, prepare(envelope, value, AUDIT_LIMITS, referee))
    except CorollaError as error:
        return Checked(envelope, str(error))


_Result = tuple[int, bytes | None, Any]


def _check_in_worker(operations: list[RawOperation]) -> list[_Result]:
    """In a worker: ``(op, body digest, (steps, attestations) as tuples, or why not)``."""
    results: list[_Result] = []
    for operation in operations:
        checked = check_operation(operation)
        digest = None if checked.envelope is None else checked.envelope.body_digest
        prepared = checked.prepared
        if isinstance(prepared, str):
            results.append((operation[0], digest, prepared))
        else:
            steps = [_values(step, _STEP_FIELDS) for step in prepared.steps]
            attestations = [_values(a, _ATTESTATION_FIELDS) for a in prepared.attestations]
            results.append((operation[0], digest, (steps, attestations)))
    return results


def _values(record: object, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in names)


class OperationChecker:
    """Checks the heavy operations submitted to it in worker processes (in this process when
    ``parallel`` is false or there is one core), and hands each result back once."""

    def __init__(self, parallel: bool) -> None:
        workers = min(os.cpu_count() or 1, _MAX_WORKERS)
        self._pool: ProcessPoolExecutor | None = None
        if parallel and workers > 1:
            # fork is quick and safe when this process runs no other thread; else start afresh.
            method = "fork" if threading.active_count() == 1 else "spawn"
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context(method)
            )
        self._pending: dict[int, Future[list[_Result]]] = {}
        self._done: dict[int, _Result] = {}
        self._submitted: set[int] = set()
        self._held: dict[int, RawOperation] = {}

    @property
    def parallel(self) -> bool:
        """Whether heavy operations are checked in other processes."""
        return self._pool is not None

    def __enter__(self) -> OperationChecker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, operations: Iterable[RawOperation]) -> None:
        """Start checking these operations (each op once; light ones are left to the caller)."""
        batch = [
            operation
            for operation in operations
            if operation[4] in HEAVY and operation[0] not in self._submitted
        ]
        if not batch:
            return
        self._submitted.update(operation[0] for operation in batch)
        if self._pool is None:
            for operation in batch:
                self._held[operation[0]] = operation
            return
        future = self._pool.submit(_check_in_worker, batch)
        for operation in batch:
            self._pending[operation[0]] = future

    def take(self, operation: RawOperation) -> Checked | None:
        """The check of a submitted operation (waiting for it), or None if never submitted."""
        op = operation[0]
        held = self._held.pop(op, None)
        if held is not None:
            return check_operation(held)
        future = self._pending.pop(op, None)
        if future is not None and op not in self._done:
            try:
                results = future.result()
            except (BrokenProcessPool, OSError) as error:
                raise LedgerError(f"the audit's worker processes failed: {error}") from None
            for result in results:
                self._done[result[0]] = result
        result = self._done.pop(op, None)
        if result is None:
            return None
        _, digest, outcome = result
        _, author, nonce, timestamp, action, _, signature, _ = operation
        envelope = (
            None
            if digest is None
            else Envelope(author, nonce, timestamp, action, digest, signature)
        )
        if isinstance(outcome, str):
            return Checked(envelope, outcome)
        if envelope is None:
            return Checked(None, "its body cannot be read")
        steps, attestations = outcome
        return Checked(
            envelope,
            Prepared(
                envelope,
                None,
                tuple(VerifiedStep(*step) for step in steps),
                tuple(VerifiedAttestation(*attestation) for attestation in attestations),
            ),
        )


class LoggedReferee:
    """The ledger's referee as the log recorded it: its finding is the logged one, and is
    recomputed when the auditor has the model."""

    def __init__(self, finding: RefereeFinding, referee: RefereeLike | None) -> None:
        self.finding = finding
        self.referee = referee
        self.recomputed = 0

    @classmethod
    def of(cls, group: list[RawEntry], referee: RefereeLike | None) -> LoggedReferee | None:
        """The stand-in for an evidence operation's entries (None: the ledger had none)."""
        logged = next((entry for entry in group if entry[1] == "fraud_evidence"), None)
        try:
            payload = None if logged is None else decode(logged[5])
        except InvalidInput:
            payload = None
        if not isinstance(payload, dict) or payload.get("referee", "none") == "none":
            return None
        finding = RefereeFinding(
            str(payload["referee"]),
            str(payload.get("referee_score", "")),
            str(payload.get("referee_note", "")),
        )
        return cls(finding, referee)

    def review(self, evidence: Any) -> RefereeFinding:
        if self.referee is not None and self.finding.status == "failed":
            mine = self.referee.review(evidence)
            if mine.status == "passed":
                raise VerificationError(
                    f"the auditor's own recomputation matches the accused's outputs (score "
                    f"{mine.score}): the referee's conviction is not supported"
                )
            self.recomputed += mine.status == "failed"  # declined: another model, not judged
        return self.finding


class LoggedJudge:
    """The ledger's referee on a dispute as the log recorded it: its judgment (or why it
    declined) is the logged one; when the auditor has the model (a referee offering ``judge``),
    it judges again and must reach the same decision: whether the node lied, and which
    verifiers did."""

    def __init__(self, payload: dict[str, Any], referee: RefereeLike | None) -> None:
        self.payload = payload
        self.referee = referee
        self.recomputed = 0

    @classmethod
    def of(cls, group: list[RawEntry], referee: RefereeLike | None) -> LoggedJudge | None:
        """The stand-in for a dispute operation's entries (None: the ledger had no referee)."""
        logged = next((entry for entry in group if entry[1] == "dispute"), None)
        try:
            payload = None if logged is None else decode(logged[5])
        except InvalidInput:
            payload = None
        if not isinstance(payload, dict) or payload.get("referee") not in ("judged", "declined"):
            return None
        return cls(payload, referee)

    def judge(self, dispute: Any) -> Any:
        from corolla.verify.disputes import Judgment

        payload = self.payload
        if payload["referee"] == "declined":
            return RefereeFinding("declined", "", str(payload.get("note", "")))
        try:
            logged = Judgment(
                node_lied=bool(payload["node_lied"]),
                node_reason=str(payload["node_reason"]),
                node_score=float(payload["node_score"]),
                lying_verifiers=tuple(
                    (bytes(key), str(why)) for key, why in payload["lying_verifiers"]
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise VerificationError(f"the logged judgment is malformed: {error}") from None
        judge = getattr(self.referee, "judge", None)
        if judge is not None:
            mine = judge(dispute)
            if isinstance(mine, Judgment):
                self.recomputed += 1
                decided = (mine.node_lied, {key for key, _ in mine.lying_verifiers})
                if decided != (logged.node_lied, {key for key, _ in logged.lying_verifiers}):
                    raise VerificationError(
                        "the auditor's own recomputation does not support the referee's judgment "
                        f"(node lied: {mine.node_lied}; lying verifiers: "
                        f"{len(mine.lying_verifiers)})"
                    )
        return logged
