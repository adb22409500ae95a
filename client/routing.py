"""Routing: the chain of nodes that covers blocks [start, end) at the lowest expected latency.

Dijkstra over block boundaries, as Petals does: an edge s -> e is a node serving blocks [s, e)
(all of its span, or a part of it), weighted by the node's measured round-trip time plus the
compute time its announced throughput implies for those blocks. With preferred peers, every
block served by another peer first costs :data:`NOT_PREFERRED`, so the route takes as few
blocks from other peers as it can and, among those routes, the fastest.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from corolla.errors import RouteUnavailable
from corolla.node.protocol.records import ServerRecord

__all__ = ["DEFAULT_RTT", "NOT_PREFERRED", "Hop", "find_route", "hop_cost"]

DEFAULT_RTT = 0.05
"""Seconds assumed for a node whose round trip was not measured yet."""

NOT_PREFERRED = 1e6
"""Cost of one block served by a peer that is not preferred, when some peers are."""


@dataclass(frozen=True)
class Hop:
    """One link of a route: `record`'s node runs blocks [start, end)."""

    record: ServerRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


def hop_cost(record: ServerRecord, start: int, end: int, rtt: float) -> float:
    """Expected seconds for one token through blocks [start, end) of `record`'s node."""
    per_block = 1.0 / (max(record.throughput, 1e-3) * (record.end - record.start))
    return rtt + (end - start) * per_block


def find_route(
    records: Iterable[ServerRecord],
    start: int,
    end: int,
    *,
    rtts: Mapping[str, float] | None = None,
    usable: Callable[[ServerRecord], bool] = lambda record: True,
    subspans: bool = True,
    prefer: Collection[str] = (),
) -> list[Hop]:
    """The cheapest chain of usable nodes covering [start, end) exactly, or RouteUnavailable.

    ``prefer``: peer ids that serve as many of the blocks as they can (see the module doc).
    """
    rtts = rtts or {}
    candidates = {r.peer_id: r for r in records if usable(r)}
    edges: dict[int, list[tuple[int, ServerRecord]]] = {}
    for record in candidates.values():
        first, last = max(record.start, start), min(record.end, end)
        if first >= last:
            continue
        starts = range(first, last) if subspans else [record.start]
        for hop_start in starts:
            if not first <= hop_start < last:
                continue
            ends = range(hop_start + 1, last + 1) if subspans else [record.end]
            for hop_end in ends:
                if hop_end <= last:
                    edges.setdefault(hop_start, []).append((hop_end, record))

    best: dict[int, float] = {start: 0.0}
    previous: dict[int, tuple[int, ServerRecord]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, position = heapq.heappop(queue)
        if position == end:
            break
        if cost > best.get(position, float("inf")):
            continue
        for hop_end, record in edges.get(position, []):
            rtt = rtts.get(record.peer_id, DEFAULT_RTT)
            total = cost + hop_cost(record, position, hop_end, rtt)
            if prefer and record.peer_id not in prefer:
                total += NOT_PREFERRED * (hop_end - position)
            if total < best.get(hop_end, float("inf")):
                best[hop_end] = total
                previous[hop_end] = (position, record)
                heapq.heappush(queue, (total, hop_end))
    if end not in best:
        covered = sorted({b for r in candidates.values() for b in r.blocks if start <= b < end})
        missing = sorted(set(range(start, end)) - set(covered))
        raise RouteUnavailable(
            f"no live, allowed node serves block(s) {_ranges(missing)} of blocks {start}:{end}"
        )
    route: list[Hop] = []
    position = end
    while position != start:
        hop_start, record = previous[position]
        route.append(Hop(record, hop_start, position))
        position = hop_start
    return route[::-1]


def _ranges(blocks: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    if not blocks:
        return "(none missing: the servers' spans do not line up)"
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][-1] + 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
