"""What happened in one inference session, in order: the record reports, summaries and tests read.

The session writes it (and only the session); everyone else reads copies. It holds the verified
work (every (request, receipt) pair the client accepted), the spot-checks and their verdicts,
the disputes the ledger judged and the rewinds they caused, the nodes that failed and who
replaced them, what each node said about the session's priority ticket, and, once the session
finished, the generated tokens whose steps went unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass

from corolla.client.disputes import DisputeCase
from corolla.client.generation import TokenRange
from corolla.client.spotcheck import CheckOutcome
from corolla.verify.receipts import Receipt, StepRequest

__all__ = ["Failover", "RewindRecord", "SessionLog", "WorkRecord"]


@dataclass(frozen=True)
class WorkRecord:
    """One verified step: the client's signed request and the node's signed receipt."""

    peer_id: str
    request: StepRequest
    receipt: Receipt

    def to_dict(self) -> dict[str, object]:
        return {
            "peer_id": self.peer_id,
            "request": self.request.to_dict(),
            "receipt": self.receipt.to_dict(),
        }


@dataclass(frozen=True)
class Failover:
    """A node the session replaced, why, and with whom."""

    peer_id: str
    start: int
    end: int
    reason: str
    replacements: tuple[str, ...]


@dataclass(frozen=True)
class RewindRecord:
    """The session dropped what node ``peer_id``'s unverified steps gave and recomputed it."""

    peer_id: str
    start: int
    end: int
    kept: int
    """Positions kept (the prompt included)."""
    reason: str


class SessionLog:
    """The session's history. Read through the properties (copies); written by the session."""

    def __init__(self) -> None:
        self._work: list[WorkRecord] = []
        self._checks: list[CheckOutcome] = []
        self._disputes: list[DisputeCase] = []
        self._rewinds: list[RewindRecord] = []
        self._failovers: list[Failover] = []
        self._faults: list[str] = []
        self._granted: dict[str, str] = {}
        self._priority_notes: list[str] = []
        self._unverified: tuple[TokenRange, ...] = ()

    @property
    def work(self) -> tuple[WorkRecord, ...]:
        """Every verified (request, receipt) pair, in the order the steps ran."""
        return tuple(self._work)

    @property
    def checks(self) -> tuple[CheckOutcome, ...]:
        """Every settled spot-check, in the order they settled."""
        return tuple(self._checks)

    @property
    def disputes(self) -> tuple[DisputeCase, ...]:
        """Every disagreement handed to the ledger, with its ruling."""
        return tuple(self._disputes)

    @property
    def rewinds(self) -> tuple[RewindRecord, ...]:
        """The times the session dropped a node's unverified outputs and recomputed them."""
        return tuple(self._rewinds)

    @property
    def failovers(self) -> tuple[Failover, ...]:
        """The nodes replaced during a step, and by whom."""
        return tuple(self._failovers)

    @property
    def faults(self) -> tuple[str, ...]:
        """Every node failure, also those while a route was being built ("peer (blocks): why")."""
        return tuple(self._faults)

    @property
    def granted(self) -> dict[str, str]:
        """Peer id -> the priority its steps ran at last ("high" or "free")."""
        return dict(self._granted)

    @property
    def priority_notes(self) -> tuple[str, ...]:
        """Why a node did not (or no longer) honour the session's ticket, one note per cause."""
        return tuple(self._priority_notes)

    @property
    def unverified(self) -> tuple[TokenRange, ...]:
        """After the session finished: generated tokens whose steps went unchecked, and why."""
        return self._unverified

    # ------------------------------------------------------------------ written by the session

    def add_work(self, record: WorkRecord) -> None:
        self._work.append(record)

    def add_check(self, outcome: CheckOutcome) -> None:
        self._checks.append(outcome)

    def add_dispute(self, case: DisputeCase) -> None:
        self._disputes.append(case)

    def add_rewind(self, record: RewindRecord) -> None:
        self._rewinds.append(record)

    def add_failover(self, failover: Failover) -> None:
        self._failovers.append(failover)

    def add_fault(self, peer_id: str, start: int, end: int, reason: str) -> int:
        """Note a node failure; returns how many the session has seen."""
        self._faults.append(f"{peer_id} (blocks {start}:{end}): {reason}")
        return len(self._faults)

    def grant(self, peer_id: str, priority: str, note: str = "") -> None:
        """The priority a node ran the session at, and its word on why if not high."""
        self._granted[peer_id] = priority
        text = f"{peer_id}: {note}"
        if note and text not in self._priority_notes:
            self._priority_notes.append(text)

    def set_unverified(self, ranges: tuple[TokenRange, ...]) -> None:
        self._unverified = ranges
