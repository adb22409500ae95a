"""The accounting rules, as pure functions: what counts as verified work, what was already
credited, and how reputation moves. The ledger applies them; the auditor replays them.

- **Verified work** is decided by :func:`creditable_work` alone (the spot-check issue tightens
  it to require verifier attestations): a (request, receipt) pair counts when the client's
  signature on the request verifies, the node's signature on the receipt verifies, the receipt
  repeats the request and binds its digest, and, for consecutive steps of one node-session
  submitted together, each receipt extends the previous one's chain digest.
- **No double credit**: a step covers the rectangle ``blocks [start, end) x tokens [position,
  position + tokens)`` of a client session. Credit is per (client, session, block, token);
  :func:`uncovered` returns the part of a rectangle that no earlier credit covered, so a
  resubmission earns nothing and a failover replay earns only what it adds.
- **Reputation** (BOINC's lesson: slow to earn, fast to lose): +1 the first time a node earns
  credit in a client session, up to a cap; a slash sets it to zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from corolla.errors import BadReceipt, InvalidInput, VerificationError
from corolla.verify.digests import chain_digest
from corolla.verify.encoding import domain_digest
from corolla.verify.identity import peer_name_of, verify_signature
from corolla.verify.receipts import Receipt, StepRequest

__all__ = [
    "MAX_POSITION",
    "Rect",
    "VerifiedStep",
    "area",
    "creditable_work",
    "parse_pairs",
    "reputation_after_credit",
    "uncovered",
]

MAX_POSITION = 2**53
"""Token positions past this are refused (no session is that long; amounts stay in 64 bits)."""

Rect = tuple[int, int, int, int]
"""``(first block, end block, first token, end token)``: half-open on both axes."""

# Fields a receipt repeats from its request (the binding check when no chain is available).
_ECHOED = (
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

    @property
    def units(self) -> int:
        """Block-tokens of work: ``tokens * blocks``."""
        return area(self.rect)


def parse_pairs(body: Any, max_pairs: int) -> list[tuple[StepRequest, Receipt]]:
    """Read ``{"pairs": [{"request": {...}, "receipt": {...}}, ...]}`` (records as
    ``to_dict()``); raises :class:`InvalidInput` naming the first bad pair."""
    if not isinstance(body, dict) or set(body) != {"pairs"}:
        raise InvalidInput('body must be an object with exactly one field, "pairs"')
    pairs = body["pairs"]
    if not isinstance(pairs, list) or not 0 < len(pairs) <= max_pairs:
        raise InvalidInput(f'"pairs" must be a list of 1 to {max_pairs} pairs')
    parsed = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict) or set(pair) != {"request", "receipt"}:
            raise InvalidInput(f'pair {index}: must be an object with "request" and "receipt"')
        try:
            parsed.append(
                (StepRequest.from_dict(pair["request"]), Receipt.from_dict(pair["receipt"]))
            )
        except InvalidInput as error:
            raise InvalidInput(f"pair {index}: {error}") from None
    return parsed


def creditable_work(pairs: Sequence[tuple[StepRequest, Receipt]]) -> list[VerifiedStep]:
    """THE definition of verified work: check every pair (see the module docstring) and return
    what each proves. Raises a :class:`VerificationError` naming the first pair that fails."""
    previous = _previous_in_chain(pairs)
    steps = []
    for index, (request, receipt) in enumerate(pairs):
        try:
            request_bytes = request.signing_bytes()
            verify_signature(request.client_key, request_bytes, request.signature)
            request_digest = _signed_digest("step-request", request_bytes, request.signature)
            receipt_bytes = receipt.signing_bytes()
            _check_binding(request, request_digest, receipt, receipt_bytes)
            before = previous.get(index)
            if before is not None:
                expected = chain_digest(
                    pairs[before][1].chain_digest,
                    receipt.step,
                    receipt.input_digest,
                    receipt.output_digest,
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
                receipt_digest=_signed_digest("receipt", receipt_bytes, receipt.signature),
                ticket_digest=request.ticket_digest,
            )
        )
    return steps


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


def _rect(receipt: Receipt) -> Rect:
    return (receipt.start, receipt.end, receipt.position, receipt.position + receipt.tokens)


def _previous_in_chain(pairs: Sequence[tuple[StepRequest, Receipt]]) -> dict[int, int]:
    """For each pair whose node-session's previous step is also in the submission, that step."""
    by_session: dict[tuple[bytes, bytes, bytes], dict[int, list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for index, (_, receipt) in enumerate(pairs):
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


def _signed_digest(domain: str, signing_bytes: bytes, signature: bytes) -> bytes:
    """``StepRequest.digest()`` / ``Receipt.digest()`` from signing bytes already computed
    (the same formula; the tests hold the two equal)."""
    return domain_digest("signed-" + domain, signing_bytes, signature)


def _check_binding(
    request: StepRequest, request_digest: bytes, receipt: Receipt, receipt_bytes: bytes
) -> None:
    """The receipt's own signature and its binding to the request (no chain to check)."""
    verify_signature(receipt.node_key, receipt_bytes, receipt.signature)
    node = peer_name_of(receipt.node_key)
    for field in _ECHOED:
        if getattr(receipt, field) != getattr(request, field):
            raise BadReceipt(f"receipt from node {node}: {field} differs from the request")
    if receipt.request_digest != request_digest:
        raise BadReceipt(f"receipt from node {node} is bound to another request")
