"""The accounting rules, as pure functions: what counts as verified work, what was already
credited, and how reputation moves. The ledger applies them; the auditor replays them.

- **Verified work** is decided by :func:`creditable_work` alone. Work reaches it only in a
  client's *report* (``POST /v1/reports``): the session's (request, receipt) pairs and the
  client's spot-check attestations, whose signatures :func:`verify_pairs` and
  :func:`corolla.ledger.reports.verify_report` checked. A node's receipt (session S, span
  ``[s, e)``, step i) is credited only when a *passed* attestation of the same report covers it
  (same node, session and span, ``i < k`` for a check of steps ``0..k-1``), that attestation
  *counts*, and no counted attestation of that node-session failed. An attestation counts when
  its verifier is independent (neither the checked node nor the client) and trusted (never
  slashed, reputation at least ``min_verifier_reputation``), and its recomputation ran the same
  model and span over exactly the tokens of the node's steps ``0..k-1``, all of which the
  report holds. A slashed node is credited nothing. Each counted attestation earns its verifier
  a fee, once per recomputation.
- **No double credit**: a step covers the rectangle ``blocks [start, end) x tokens [position,
  position + tokens)`` of a client session. Credit is per (client, session, block, token);
  :func:`uncovered` returns the part of a rectangle that no earlier credit covered, so a
  resubmission earns nothing and a failover replay earns only what it adds.
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
from corolla.verify.digests import GENESIS_CHAIN
from corolla.verify.fast import chain_digest, signed_digest
from corolla.verify.identity import peer_name_of, verify_signature
from corolla.verify.receipts import Receipt, StepRequest

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

    @property
    def units(self) -> int:
        """Block-tokens of work: ``tokens * blocks``."""
        return area(self.rect)

    @property
    def tokens(self) -> int:
        return self.rect[3] - self.rect[2]


@dataclass(frozen=True, slots=True)
class VerifiedAttestation:
    """A spot-check attestation whose recomputation receipt verified: the client says steps
    ``0..steps-1`` of ``node_key``'s session ``session_id`` on blocks ``[start, end)`` were
    compared with ``verifier_key``'s recomputation of ``tokens`` tokens, and ``passed``."""

    index: int
    node_key: bytes
    client_key: bytes
    verifier_key: bytes
    session_id: bytes
    start: int
    end: int
    steps: int
    passed: bool
    tokens: int
    model_digest: bytes
    span_digest: bytes
    receipt_digest: bytes

    @property
    def units(self) -> int:
        """Block-tokens the verifier recomputed."""
        return self.tokens * (self.end - self.start)


@dataclass(frozen=True, slots=True)
class Credit:
    """What :func:`creditable_work` decided for one report."""

    credited: dict[int, int]
    """Pair index -> index of the attestation that covers it, for every creditable pair."""
    refused: dict[int, str]
    """Pair index -> why it earns nothing."""
    counted: tuple[VerifiedAttestation, ...]
    """Attestations that count (their verifiers earn a fee)."""
    ignored: dict[int, str]
    """Attestation index -> why it does not count."""


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
            )
        )
    return steps


def creditable_work(
    steps: Sequence[VerifiedStep],
    attestations: Sequence[VerifiedAttestation],
    standing: Standing,
    min_verifier_reputation: int,
) -> Credit:
    """THE definition of creditable work (see the module docstring): which verified steps of a
    report earn credit, which attestations count. ``standing`` reads the ledger's state as it
    was before the report; every signature was checked before (:func:`verify_pairs`)."""
    groups: dict[tuple[bytes, bytes, int, int], dict[int, list[VerifiedStep]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for step in steps:
        key = (step.node_key, step.session_id, step.rect[0], step.rect[1])
        groups[key][step.step].append(step)
    counted: list[VerifiedAttestation] = []
    ignored: dict[int, str] = {}
    for attestation in attestations:
        reason = _why_not_counted(attestation, groups, standing, min_verifier_reputation)
        if reason is None:
            counted.append(attestation)
        else:
            ignored[attestation.index] = reason
    failed = {_group_of(a) for a in counted if not a.passed}
    covering: dict[int, int] = {}
    for attestation in counted:
        key = _group_of(attestation)
        if not attestation.passed or key in failed:
            continue
        for number in range(attestation.steps):
            for step in groups[key][number]:
                covering.setdefault(step.index, attestation.index)
    credited: dict[int, int] = {}
    refused: dict[int, str] = {}
    for step in steps:
        key = (step.node_key, step.session_id, step.rect[0], step.rect[1])
        if standing(step.node_key)[0]:
            refused[step.index] = "the node was slashed"
        elif key in failed:
            refused[step.index] = "a spot-check of this node-session failed"
        elif step.index in covering:
            credited[step.index] = covering[step.index]
        else:
            refused[step.index] = (
                "no passed spot-check by a trusted, independent verifier covers it"
            )
    return Credit(credited, refused, tuple(counted), ignored)


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


def area(rect: Rect) -> int:
    """Block-tokens in a rectangle."""
    return (rect[1] - rect[0]) * (rect[3] - rect[2])


def reputation_after_credit(reputation: int, cap: int) -> int:
    """Reputation after a node's first credit in a new client session: +1, capped."""
    return min(cap, reputation + 1)


def _group_of(attestation: VerifiedAttestation) -> tuple[bytes, bytes, int, int]:
    return (attestation.node_key, attestation.session_id, attestation.start, attestation.end)


def _why_not_counted(
    attestation: VerifiedAttestation,
    groups: dict[tuple[bytes, bytes, int, int], dict[int, list[VerifiedStep]]],
    standing: Standing,
    min_reputation: int,
) -> str | None:
    verifier = attestation.verifier_key
    if verifier == attestation.node_key:
        return "the verifier is the checked node itself"
    if verifier == attestation.client_key:
        return "the verifier is the client itself"
    slashed, reputation = standing(verifier)
    if slashed:
        return f"verifier {peer_name_of(verifier)} was slashed"
    if reputation < min_reputation:
        return (
            f"verifier {peer_name_of(verifier)} has reputation {reputation}, below the "
            f"{min_reputation} a verifier needs"
        )
    group = groups.get(_group_of(attestation), {})
    total = 0
    for number in range(attestation.steps):
        found = group.get(number, [])
        if not found:
            return f"the report lacks the node's step {number} of the {attestation.steps} checked"
        if len(found) > 1:
            return f"the report holds two receipts of the node's step {number}"
        step = found[0]
        if (step.model_digest, step.span_digest) != (
            attestation.model_digest,
            attestation.span_digest,
        ):
            return "the recomputation ran another model or span than the node"
        total += step.tokens
    if total != attestation.tokens:
        return (
            f"the recomputation covers {attestation.tokens} tokens, the node's steps "
            f"0..{attestation.steps - 1} cover {total}"
        )
    return None


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
