"""Who checks a node's work: a draw neither the client nor the node can bias, and anyone can redo.

A check of node N's session S over steps ``[first, end)`` (span ``[start, end_block)``) is
assigned by the seed::

    seed = H("verifier-assignment", beacon.value, N, S, start, end_block, end, chain)

where ``chain`` is N's signed chain digest after the last checked step (it pins every output N
claimed) and ``beacon`` is the ledger's beacon of an epoch that began *after* the client
received that receipt (:mod:`corolla.verify.beacon`). When N signed its outputs, nobody knew the
beacon; when the beacon is known, N's outputs are fixed: N cannot grind its outputs for a
friendly draw, and the client cannot choose the beacon.

The candidates are every verifier the ledger knows to serve the span with N's compute profile
(declared before the beacon's epoch began), ranked by ``H("verifier-rank", seed, key)``. The
ranking of two candidates does not depend on who else is a candidate, so adding or removing one
moves no one else. The assigned verifier is the first trusted candidate in rank order that is
neither N nor the client; the client may pass over at most :data:`MAX_SKIPS` of them (a verifier
that is down), and the ledger counts a verdict only from a verifier within that reach.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from corolla.errors import InvalidInput
from corolla.verify.beacon import Beacon
from corolla.verify.encoding import canonical, domain_digest, domain_message

_EMPTY_BYTES = canonical(b"")

__all__ = ["MAX_SKIPS", "assignment_seed", "rank", "within_reach"]

MAX_SKIPS = 1
"""Assigned verifiers a client may pass over as unreachable (each skip is a chance for a
colluding client to reach an accomplice: with a share q of colluding candidates, a check lands
on one with probability about ``1 - (1 - q) ** (MAX_SKIPS + 1)``)."""


def assignment_seed(
    beacon: Beacon,
    node_key: bytes,
    session_id: bytes,
    start: int,
    end: int,
    end_step: int,
    node_chain: bytes,
) -> bytes:
    """The seed of the check of ``node_key``'s session up to (not including) ``end_step``."""
    for name, value, size in (
        ("node key", node_key, 32),
        ("session id", session_id, 16),
        ("node chain", node_chain, 32),
    ):
        if not isinstance(value, bytes) or len(value) != size:
            raise InvalidInput(f"an assignment's {name} must be {size} bytes")
    return domain_digest(
        "verifier-assignment", beacon.value, node_key, session_id, start, end, end_step, node_chain
    )


def rank(seed: bytes, candidates: Iterable[bytes]) -> list[bytes]:
    """``candidates`` (public keys, duplicates dropped) in the order the seed draws them: by
    ``domain_digest("verifier-rank", seed, key)``, hashed from the seed's encoding once (the
    ledger ranks every candidate of every counted attestation)."""
    prefix = domain_message("verifier-rank", seed, b"")[: -len(_EMPTY_BYTES)]

    def draw(key: bytes) -> bytes:
        return hashlib.sha256(prefix + b"\x05" + len(key).to_bytes(4, "big") + key).digest()

    return sorted(set(candidates), key=draw)


def within_reach(
    seed: bytes,
    candidates: Iterable[bytes],
    excluded: Iterable[bytes],
    trusted: Callable[[bytes], bool],
    max_skips: int = MAX_SKIPS,
) -> list[bytes]:
    """The verifiers a check with ``seed`` may count: the first ``max_skips + 1`` candidates in
    rank order that are trusted and not ``excluded`` (the checked node and the client)."""
    barred = set(excluded)
    eligible = [key for key in rank(seed, candidates) if key not in barred and trusted(key)]
    return eligible[: max_skips + 1]
