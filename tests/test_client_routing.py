"""Routing: the cheapest chain over the blocks, and preferred peers (ClientConfig.prefer)."""

from __future__ import annotations

import pytest

from corolla.client.routing import find_route
from corolla.errors import RouteUnavailable
from corolla.node.protocol.records import NodeState, ServerRecord

MODEL = bytes(32)


def record(name: str, start: int, end: int, throughput: float = 100.0) -> ServerRecord:
    return ServerRecord(
        peer_id=name,
        public_key=bytes(32),
        model_digest=MODEL,
        span_digest=bytes(32),
        start=start,
        end=end,
        throughput=throughput,
        cache_tokens_free=1024,
        quant="none",
        dtype="float32",
        state=NodeState.ONLINE,
        version="test",
        expires_at=1e9,
    )


def names(route) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


def test_the_route_takes_the_lowest_latency_chain():
    records = [record("near", 0, 4), record("far", 0, 4)]
    route = find_route(records, 0, 4, rtts={"near": 0.001, "far": 0.5})
    assert names(route) == [("near", 0, 4)]


def test_a_preferred_peer_is_taken_even_when_it_is_slower():
    records = [record("near", 0, 4), record("far", 0, 4)]
    route = find_route(records, 0, 4, rtts={"near": 0.001, "far": 0.5}, prefer={"far"})
    assert names(route) == [("far", 0, 4)]


def test_a_preferred_peer_serves_every_block_it_can_and_others_fill_the_rest():
    records = [record("whole", 0, 4), record("chosen", 2, 4)]
    route = find_route(records, 0, 4, rtts={"whole": 0.001, "chosen": 0.5}, prefer={"chosen"})
    assert names(route) == [("whole", 0, 2), ("chosen", 2, 4)]


def test_without_subspans_a_preferred_peer_is_taken_only_whole():
    records = [record("whole", 0, 4), record("head", 0, 2), record("chosen", 2, 4)]
    rtts = {"whole": 0.001, "head": 0.5, "chosen": 0.5}
    route = find_route(records, 0, 4, rtts=rtts, subspans=False, prefer={"chosen"})
    assert names(route) == [("head", 0, 2), ("chosen", 2, 4)]


def test_preferring_unknown_or_unusable_peers_changes_nothing():
    records = [record("near", 0, 4), record("far", 0, 4)]
    rtts = {"near": 0.001, "far": 0.5}
    route = find_route(
        records, 0, 4, rtts=rtts, prefer={"gone", "far"}, usable=lambda r: r.peer_id != "far"
    )
    assert names(route) == [("near", 0, 4)]


def test_a_preference_never_makes_a_route_out_of_missing_blocks():
    with pytest.raises(RouteUnavailable, match=r"block\(s\) 2-3"):
        find_route([record("half", 0, 2)], 0, 4, prefer={"half"})
