"""A client's report of a session: the nodes' (request, receipt) pairs and the verifiers' signed
verdicts on them, the only way work earns points (``POST /v1/reports``).

Wire form (JSON; records as standard base64 of their canonical ``to_bytes()``)::

    {"pairs": [{"request": B64, "receipt": B64}, ...],
     "attestations": [{"verdict": {CheckVerdict.to_dict()}, "request": B64, "receipt": B64,
                       "beacon": {Beacon.to_dict()}}, ...]}

An attestation (checks v2, ``docs/checks-protocol.md``) is what a verifier V signed after it
compared node N's steps ``[first_step, end_step)`` with its own recomputation: its
:class:`~corolla.verify.verdicts.CheckVerdict`, the client's request to V for that
recomputation and V's receipt for it (the verdict names the receipt's digest), and the ledger's
:class:`~corolla.verify.beacon.Beacon` of the epoch that assigned V. The client's own word (a
score it computed, a verdict it wrote) is not part of it: nothing credits on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corolla.errors import InvalidInput
from corolla.ledger.api.models import b64decode, b64encode
from corolla.verify.beacon import Beacon
from corolla.verify.fast import read_receipt, read_request
from corolla.verify.receipts import Receipt, StepRequest
from corolla.verify.verdicts import CheckVerdict

__all__ = [
    "Attestation",
    "WireAttestation",
    "parse_attestation",
    "report_batches",
    "report_body",
]

_ATTESTATION_FIELDS = frozenset({"verdict", "request", "receipt", "beacon"})


@dataclass(frozen=True, slots=True)
class Attestation:
    """A verifier's signed verdict on a node-session's steps, with the recomputation behind it
    (the client's request to the verifier and the verifier's receipt) and the beacon that
    assigned the verifier."""

    verdict: CheckVerdict
    request: StepRequest
    receipt: Receipt
    beacon: Beacon

    def __post_init__(self) -> None:
        kinds = (
            (self.verdict, CheckVerdict),
            (self.request, StepRequest),
            (self.receipt, Receipt),
            (self.beacon, Beacon),
        )
        if not all(isinstance(value, kind) for value, kind in kinds):
            raise InvalidInput("an attestation holds a CheckVerdict, StepRequest, Receipt, Beacon")

    @property
    def group(self) -> tuple[bytes, bytes, int, int]:
        """The node-session it checks: (node, session, start, end)."""
        verdict = self.verdict
        return (verdict.node_key, verdict.session_id, verdict.start, verdict.end)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a report carries."""
        return {
            "verdict": self.verdict.to_dict(),
            "request": b64encode(self.request.to_bytes()),
            "receipt": b64encode(self.receipt.to_bytes()),
            "beacon": self.beacon.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Attestation:
        """Parse :meth:`to_dict` output strictly; raises :class:`InvalidInput`."""
        wire = parse_attestation(data)
        return cls(wire.verdict, wire.request, wire.receipt, wire.beacon)


@dataclass(frozen=True, slots=True)
class WireAttestation:
    """An attestation as read from a report, with the signing bytes of its records."""

    verdict: CheckVerdict
    request: StepRequest
    request_bytes: bytes
    receipt: Receipt
    receipt_bytes: bytes
    beacon: Beacon


def report_body(
    pairs: Sequence[tuple[StepRequest, Receipt]], attestations: Sequence[Attestation]
) -> dict[str, Any]:
    """The JSON body of a report."""
    return {
        "pairs": [
            {"request": b64encode(r.to_bytes()), "receipt": b64encode(c.to_bytes())}
            for r, c in pairs
        ],
        "attestations": [attestation.to_dict() for attestation in attestations],
    }


def report_batches(
    pairs: Sequence[tuple[StepRequest, Receipt]],
    attestations: Sequence[Attestation],
    batch_pairs: int,
) -> list[tuple[list[tuple[StepRequest, Receipt]], list[Attestation]]]:
    """Split a report into reports of about ``batch_pairs`` pairs that keep each node-session
    whole, each with the attestations that check its node-sessions (an attestation of a
    node-session without pairs here goes with the first)."""
    groups: dict[tuple[bytes, bytes, int, int], list[tuple[StepRequest, Receipt]]] = {}
    for request, receipt in pairs:
        key = (receipt.node_key, receipt.session_id, receipt.start, receipt.end)
        groups.setdefault(key, []).append((request, receipt))
    batches: list[tuple[list[tuple[StepRequest, Receipt]], list[Attestation]]] = []
    where: dict[tuple[bytes, bytes, int, int], int] = {}
    for key, group in groups.items():
        if not batches or len(batches[-1][0]) + len(group) > batch_pairs:
            batches.append(([], []))
        batches[-1][0].extend(group)
        where[key] = len(batches) - 1
    for attestation in attestations:
        batches[where.get(attestation.group, 0)][1].append(attestation)
    return batches


def parse_attestation(data: Any) -> WireAttestation:
    """Read an attestation's JSON form strictly; raises :class:`InvalidInput`."""
    if not isinstance(data, dict) or set(data) != _ATTESTATION_FIELDS:
        raise InvalidInput(
            f"an attestation has exactly the fields {sorted(_ATTESTATION_FIELDS)} (a verifier's "
            "signed verdict, the recomputation's request and receipt, the ledger's beacon)"
        )
    verdict = CheckVerdict.from_dict(data["verdict"])
    request, request_bytes = read_request(b64decode(data["request"]))
    receipt, receipt_bytes = read_receipt(b64decode(data["receipt"]))
    beacon = Beacon.from_dict(data["beacon"])
    return WireAttestation(verdict, request, request_bytes, receipt, receipt_bytes, beacon)
