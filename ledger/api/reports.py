"""A client's report of a session: the nodes' (request, receipt) pairs and the client's
spot-check attestations, the only way work earns points (``POST /v1/reports``).

Wire form (JSON; records as standard base64 of their canonical ``to_bytes()``)::

    {"pairs": [{"request": B64, "receipt": B64}, ...],
     "attestations": [{"node": HEX32, "session": HEX16, "start": INT, "end": INT,
                       "steps": INT, "passed": BOOL, "score": TEXT,
                       "request": B64, "receipt": B64}, ...]}

An attestation says: steps ``0..steps-1`` of ``node``'s session ``session`` on blocks
``[start, end)`` were compared with a verifier's one-shot recomputation, and ``passed`` or
not (``score``: the comparison's score as text, e.g. ``repr(float)``; the canonical encoding
has no floats). The recomputation is the client's signed request (step 0, position 0, the
same model, span and blocks, ``tokens`` = the summed tokens of the checked steps) and the
verifier's signed receipt for it, chained from the genesis digest. The report's envelope is
signed by the client, which must be the client of every pair and attestation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corolla.errors import InvalidInput
from corolla.ledger.api.models import b64decode, b64encode, from_hex
from corolla.verify.fast import read_receipt, read_request
from corolla.verify.receipts import MAX_BLOCK, SESSION_ID_SIZE, Receipt, StepRequest

__all__ = [
    "Attestation",
    "WireAttestation",
    "parse_attestation",
    "report_batches",
    "report_body",
]

_ATTESTATION_FIELDS = frozenset(
    {"node", "session", "start", "end", "steps", "passed", "score", "request", "receipt"}
)
_SCORE = re.compile(r"(?:inf|nan|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)")
_MAX_SCORE = 32
_MAX_STEPS = 2**31


@dataclass(frozen=True, slots=True)
class Attestation:
    """A client's record of one spot-check of a node-session (what it reports)."""

    node_key: bytes
    session_id: bytes
    start: int
    end: int
    steps: int
    passed: bool
    score: str
    request: StepRequest
    receipt: Receipt

    def __post_init__(self) -> None:
        _check_attestation_fields(
            self.node_key, self.session_id, self.start, self.end, self.steps, self.passed
        )
        _check_score(self.score)
        if not isinstance(self.request, StepRequest) or not isinstance(self.receipt, Receipt):
            raise InvalidInput("an attestation holds a StepRequest and a Receipt")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a report carries."""
        return {
            "node": self.node_key.hex(),
            "session": self.session_id.hex(),
            "start": self.start,
            "end": self.end,
            "steps": self.steps,
            "passed": self.passed,
            "score": self.score,
            "request": b64encode(self.request.to_bytes()),
            "receipt": b64encode(self.receipt.to_bytes()),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Attestation:
        """Parse :meth:`to_dict` output strictly; raises :class:`InvalidInput`."""
        parsed = parse_attestation(data)
        return cls(
            parsed.node_key,
            parsed.session_id,
            parsed.start,
            parsed.end,
            parsed.steps,
            parsed.passed,
            parsed.score,
            parsed.request,
            parsed.receipt,
        )


@dataclass(frozen=True, slots=True)
class WireAttestation:
    node_key: bytes
    session_id: bytes
    start: int
    end: int
    steps: int
    passed: bool
    score: str
    request: StepRequest
    request_bytes: bytes
    receipt: Receipt
    receipt_bytes: bytes


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
        key = (attestation.node_key, attestation.session_id, attestation.start, attestation.end)
        batches[where.get(key, 0)][1].append(attestation)
    return batches


def parse_attestation(data: Any) -> WireAttestation:
    if not isinstance(data, dict) or set(data) != _ATTESTATION_FIELDS:
        raise InvalidInput(f"an attestation has exactly the fields {sorted(_ATTESTATION_FIELDS)}")
    node, session = from_hex(data["node"]), from_hex(data["session"])
    start, end, steps, passed = data["start"], data["end"], data["steps"], data["passed"]
    _check_attestation_fields(node, session, start, end, steps, passed)
    _check_score(data["score"])
    request, request_bytes = read_request(b64decode(data["request"]))
    receipt, receipt_bytes = read_receipt(b64decode(data["receipt"]))
    return WireAttestation(
        node, session, start, end, steps, passed, data["score"], request, request_bytes,
        receipt, receipt_bytes,
    )  # fmt: skip


def _check_attestation_fields(
    node: Any, session: Any, start: Any, end: Any, steps: Any, passed: Any
) -> None:
    if not isinstance(node, bytes) or len(node) != 32:
        raise InvalidInput("an attestation's node is a 32-byte public key")
    if not isinstance(session, bytes) or len(session) != SESSION_ID_SIZE:
        raise InvalidInput(f"an attestation's session is {SESSION_ID_SIZE} bytes")
    for name, value, low, high in (
        ("start", start, 0, MAX_BLOCK),
        ("end", end, 0, MAX_BLOCK),
        ("steps", steps, 1, _MAX_STEPS),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidInput(f"an attestation's {name} must be an integer in [{low}, {high}]")
    if start >= end:
        raise InvalidInput(f"an attestation's span [{start}, {end}) holds no blocks")
    if not isinstance(passed, bool):
        raise InvalidInput("an attestation's passed must be true or false")


def _check_score(score: Any) -> None:
    if not isinstance(score, str) or len(score) > _MAX_SCORE or not _SCORE.fullmatch(score):
        raise InvalidInput(
            "an attestation's score is a decimal number as text (e.g. '3.2e-06', 'inf')"
        )
