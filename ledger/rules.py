"""The accounting rules, as pure functions: what counts as verified work, what was already
credited, and how reputation moves. The ledger applies them; the auditor replays them.

- **Verified work** is decided by :func:`creditable_work` alone. Work reaches it only in a
  client's *report* (``POST /v1/reports``): the session's (request, receipt) pairs and the
  verifiers' signed verdicts on them (checks v2), whose signatures :func:`verify_pairs` and
  :func:`corolla.ledger.reports.verify_report` checked and whose assignment
  :mod:`corolla.ledger.checks` re-derived (an attestation that fails any of that refuses the
  report). A node's receipt (session S, span ``[s, e)``, step i) is credited only when a
  *passed* verdict of the same report covers it (same node, session and span,
  ``first_step <= i < end_step``) and no verdict of that node-session in the report *failed*.
  A slashed node is credited nothing.
- **No double credit**: a step covers the rectangle ``blocks [start, end) x tokens [position,
  position + tokens)`` of a client session. Credit is per (client, session, block, token);
  :func:`uncovered` returns the part of a rectangle that no earlier credit covered, so a
  resubmission earns nothing and a failover replay earns only what it adds. A verifier's fee
  follows the same rule per verifier: each position it checked is paid once.
- **Reputation** (BOINC's lesson: slow to earn, fast to lose): +1 the first time a node earns
  credit in a client session, which needs a passed check, up to a cap; a slash sets it to zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from corolla.errors import BadReceipt, InvalidInput, VerificationError
from corolla.verify.beacon import Beacon
from corolla.verify.digests import GENESIS_CHAIN
from corolla.verify.fast import chain_digest, signed_digest
from corolla.verify.identity import peer_name_of, verify_signature
from corolla.verify.receipts import Receipt, StepRequest
from corolla.verify.verdicts import CheckVerdict

__all__ = [
    "MAX_POSITION",
    "Credit",
    "Rect",
    "SignedPair",
    "Standing",
    "VerifiedAttestation",
    "VerifiedStep",
    "area",
    "creditable_work",
    "overlap",
    "parse_pairs",
    "reputation_after_credit",
    "uncovered",
    "verify_pairs",
]

MAX_POSITION = 2**53
"""Token positions past this are refused (no session is that long; amounts stay in 64 bits)."""

Rect = tuple[int, int, int, int]
"""``(first block, end block, first token, end token)``: half-open on both axes."""

SignedPair = tuple[StepRequest, bytes, Receipt, bytes]
"""A request and a receipt, each with its signing bytes (computed once, when read)."""

Standing = Callable[[bytes], tuple[bool, int]]
"""``key -> (slashed, reputation)`` of an account (``(False, 0)`` for an unknown key)."""

# Fields a receipt repeats from its request (the binding check when no chain is available).
ECHOED_FIELDS = (
    "protocol_version",
    "model_digest",
    "span_digest",
    "start",
    "end",
    "session_id",
    "step",
    "position",
    "tokens",
    "client_key",
    "input_digest",
)


@dataclass(frozen=True, slots=True)
class VerifiedStep:
    """What the ledger needs of one verified (request, receipt) pair."""

    index: int
    node_key: bytes
    client_key: bytes
    session_id: bytes
    rect: Rect
    request_digest: bytes
    receipt_digest: bytes
    ticket_digest: bytes | None
    step: int = 0
    model_digest: bytes = b""
    span_digest: bytes = b""
    chain_digest: bytes = b""

    @property
    def group(self) -> tuple[bytes, bytes, int, int]:
        """Its node-session: (node, session, start, end)."""
        return (self.node_key, self.session_id, self.rect[0], self.rect[1])

    @property
    def units(self) -> int:
        """Block-tokens of work: ``tokens * blocks``."""
        return area(self.rect)

    @property
    def tokens(self) -> int:
        return self.rect[3] - self.rect[2]


@dataclass(frozen=True, slots=True)
class VerifiedAttestation:
    """A verifier's verdict whose signatures, recomputation and beacon verified, and that fits
    the report's pairs: ``verifier_key`` compared ``node_key``'s steps ``[first_step,
    end_step)`` (positions ``[first_position, end_position)``) of session ``session_id`` on
    blocks ``[start, end)`` for client ``client_key``, and ``passed``. ``seed`` is the
    assignment's seed, re-derived from the beacon and the node's chain in the report."""

    index: int
    node_key: bytes
    client_key: bytes
    verifier_key: bytes
    session_id: bytes
    start: int
    end: int
    first_step: int
    end_step: int
    first_position: int
    end_position: int
    passed: bool
    model_digest: bytes
    profile: str
    seed: bytes
    verdict_digest: bytes
    verdict: CheckVerdict
    beacon: Beacon

    @property
    def group(self) -> tuple[bytes, bytes, int, int]:
        """The node-session it checks: (node, session, start, end)."""
        return (self.node_key, self.session_id, self.start, self.end)

    @property
    def rect(self) -> Rect:
        """What the verifier checked: blocks x token positions."""
        return (self.start, self.end, self.first_position, self.end_position)


@dataclass(frozen=True, slots=True)
class Credit:
    """What :func:`creditable_work` decided for one report."""

    credited: dict[int, int]
    """Pair index -> index of the attestation that covers it, for every creditable pair."""
    refused: dict[int, str]
    """Pair index -> why it earns nothing."""


def parse_pairs(body: Any, max_pairs: int) -> list[SignedPair]:
    """Read ``{"pairs": [{"request": {...}, "receipt": {...}}, ...]}`` (records as
    ``to_dict()``); raises :class:`InvalidInput` naming the first bad pair."""
    if not isinstance(body, dict) or set(body) != {"pairs"}:
        raise InvalidInput('body must be an object with exactly one field, "pairs"')
    pairs = body["pairs"]
    if not isinstance(pairs, list) or not 0 < len(pairs) <= max_pairs:
        raise InvalidInput(f'"pairs" must be a list of 1 to {max_pairs} pairs')
    parsed: list[SignedPair] = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict) or set(pair) != {"request", "receipt"}:
            raise InvalidInput(f'pair {index}: must be an object with "request" and "receipt"')
        try:
            request = StepRequest.from_dict(pair["request"])
            receipt = Receipt.from_dict(pair["receipt"])
        except InvalidInput as error:
            raise InvalidInput(f"pair {index}: {error}") from None
        parsed.append((request, request.signing_bytes(), receipt, receipt.signing_bytes()))
    return parsed


def verify_pairs(pairs: Sequence[SignedPair], *, reporter: bytes | None) -> list[VerifiedStep]:
    """Check every pair and return what each proves; raises a :class:`VerificationError` (or
    :class:`InvalidInput`) naming the first pair that fails.

    Each receipt's signature verifies under its node's key, repeats its request and binds its
    digest; a step-0 receipt starts the session's chain and, for consecutive steps of one
    node-session submitted together, each receipt extends the previous one's chain digest.
    With ``reporter`` (a client's report), every request must be that client's, and its own
    signature is not checked again: the report's envelope, signed by that same key and
    re-verified by every audit, covers every byte of it. Without (a node redeeming tickets),
    each request's client signature is checked.
    """
    previous = _previous_in_chain(pairs)
    steps = []
    for index, (request, request_bytes, receipt, receipt_bytes) in enumerate(pairs):
        try:
            if reporter is None:
                verify_signature(request.client_key, request_bytes, request.signature)
            elif request.client_key != reporter:
                raise BadReceipt(
                    f"the request is client {peer_name_of(request.client_key)}'s, not the "
                    f"reporter's ({peer_name_of(reporter)})"
                )
            request_digest = signed_digest(request, request_bytes)
            _check_binding(request, request_digest, receipt, receipt_bytes)
            before = previous.get(index)
            chain = GENESIS_CHAIN if receipt.step == 0 else None
            if before is not None:
                chain = pairs[before][2].chain_digest
            if chain is not None:
                expected = chain_digest(
                    chain, receipt.step, receipt.input_digest, receipt.output_digest
                )
                if receipt.chain_digest != expected:
                    raise BadReceipt(
                        f"receipt from node {peer_name_of(receipt.node_key)} does not extend "
                        "the session's chain"
                    )
        except VerificationError as error:
            raise type(error)(f"pair {index}: {error}") from None
        if receipt.position + receipt.tokens > MAX_POSITION:
            raise InvalidInput(f"pair {index}: token interval ends beyond {MAX_POSITION}")
        steps.append(
            VerifiedStep(
                index=index,
                node_key=receipt.node_key,
                client_key=receipt.client_key,
                session_id=receipt.session_id,
                rect=_rect(receipt),
                request_digest=request_digest,
                receipt_digest=signed_digest(receipt, receipt_bytes),
                ticket_digest=request.ticket_digest,
                step=receipt.step,
                model_digest=receipt.model_digest,
                span_digest=receipt.span_digest,
                chain_digest=receipt.chain_digest,
            )
        )
    return steps


def creditable_work(
    steps: Sequence[VerifiedStep],
    attestations: Sequence[VerifiedAttestation],
    standing: Standing,
) -> Credit:
    """THE definition of creditable work (see the module docstring): which verified steps of a
    report earn credit. Every attestation given counts (the report was refused otherwise);
    ``standing`` reads the ledger's state as it was before the report."""
    failed = {attestation.group for attestation in attestations if not attestation.passed}
    covering: dict[int, int] = {}
    passed = [a for a in attestations if a.passed and a.group not in failed]
    for step in steps:
        for attestation in passed:
            if step.group == attestation.group and (
                attestation.first_step <= step.step < attestation.end_step
            ):
                covering.setdefault(step.index, attestation.index)
                break
    credited: dict[int, int] = {}
    refused: dict[int, str] = {}
    for step in steps:
        if standing(step.node_key)[0]:
            refused[step.index] = "the node was slashed"
        elif step.group in failed:
            refused[step.index] = "a check of this node-session failed"
        elif step.index in covering:
            credited[step.index] = covering[step.index]
        else:
            refused[step.index] = "no passed check by its assigned verifier covers it"
    return Credit(credited, refused)


def uncovered(rect: Rect, covered: Sequence[Rect]) -> list[Rect]:
    """The disjoint pieces of ``rect`` outside every rectangle of ``covered``, sorted."""
    b0, b1, t0, t1 = rect
    clipped = [
        (max(b0, c0), min(b1, c1), max(t0, d0), min(t1, d1))
        for c0, c1, d0, d1 in covered
        if c0 < b1 and c1 > b0 and d0 < t1 and d1 > t0
    ]
    if not clipped:
        return [rect]
    blocks = sorted({b0, b1, *(c[0] for c in clipped), *(c[1] for c in clipped)})
    tokens = sorted({t0, t1, *(c[2] for c in clipped), *(c[3] for c in clipped)})
    # For each slab of blocks, the token intervals nobody covered (adjacent cells merged).
    slabs: list[tuple[int, int, list[tuple[int, int]]]] = []
    for lo, hi in pairwise(blocks):
        free: list[tuple[int, int]] = []
        for start, end in pairwise(tokens):
            if any(c[0] <= lo and hi <= c[1] and c[2] <= start and end <= c[3] for c in clipped):
                continue
            if free and free[-1][1] == start:
                free[-1] = (free[-1][0], end)
            else:
                free.append((start, end))
        if slabs and slabs[-1][1] == lo and slabs[-1][2] == free:
            slabs[-1] = (slabs[-1][0], hi, free)
        else:
            slabs.append((lo, hi, free))
    return [(lo, hi, start, end) for lo, hi, free in slabs for start, end in free]


def overlap(a: Rect, b: Rect) -> bool:
    """Whether two rectangles share a cell."""
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def area(rect: Rect) -> int:
    """Block-tokens in a rectangle."""
    return (rect[1] - rect[0]) * (rect[3] - rect[2])


def reputation_after_credit(reputation: int, cap: int) -> int:
    """Reputation after a node's first credit in a new client session: +1, capped."""
    return min(cap, reputation + 1)


def _rect(receipt: Receipt) -> Rect:
    return (receipt.start, receipt.end, receipt.position, receipt.position + receipt.tokens)


def _previous_in_chain(pairs: Sequence[SignedPair]) -> dict[int, int]:
    """For each pair whose node-session's previous step is also in the submission, that step."""
    by_session: dict[tuple[bytes, bytes, bytes], dict[int, list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for index, (_, _, receipt, _) in enumerate(pairs):
        key = (receipt.node_key, receipt.client_key, receipt.session_id)
        by_session[key][receipt.step].append(index)
    previous = {}
    for steps in by_session.values():
        for step, indexes in steps.items():
            before = steps.get(step - 1)
            # Only unambiguous links: one receipt at each of the two steps.
            if before is not None and len(before) == 1 and len(indexes) == 1:
                previous[indexes[0]] = before[0]
    return previous


def _check_binding(
    request: StepRequest, request_digest: bytes, receipt: Receipt, receipt_bytes: bytes
) -> None:
    """The receipt's own signature and its binding to the request."""
    verify_signature(receipt.node_key, receipt_bytes, receipt.signature)
    node = peer_name_of(receipt.node_key)
    for field in ECHOED_FIELDS:
        if getattr(receipt, field) != getattr(request, field):
            raise BadReceipt(f"receipt from node {node}: {field} differs from the request")
    if receipt.request_digest != request_digest:
        raise BadReceipt(f"receipt from node {node} is bound to another request")
