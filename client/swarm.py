"""The client's window on the swarm: node records, round trips, bans, routes.

Everything it sends goes through a :class:`~corolla.client.transport.SwarmTransport` (hivemind by
default), so a test can give the same logic an in-process network.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from corolla.client.bans import BanList
from corolla.client.routing import Hop, find_route
from corolla.client.transport import HivemindTransport, SwarmTransport
from corolla.errors import CorollaError, InvalidInput, RouteUnavailable
from corolla.node.protocol.records import NodeState, ServerRecord

__all__ = ["ClientConfig", "Swarm"]

DEFAULT_CLIENT_IDENTITY = Path.home() / ".corolla" / "client.key"


@dataclass(frozen=True)
class ClientConfig:
    """How a client joins the swarm and how patient it is with nodes."""

    initial_peers: tuple[str, ...]
    identity: Path = DEFAULT_CLIENT_IDENTITY
    connect_timeout: float = 30.0
    open_timeout: float = 15.0
    step_timeout: float = 30.0
    ping_timeout: float = 3.0
    max_failovers: int = 4
    """Node failures tolerated in one inference session before giving up."""
    ban_seconds: float = 15.0
    allow: frozenset[str] = frozenset()
    """If not empty, only these peer ids are used."""
    block: frozenset[str] = frozenset()
    records_ttl: float = 3.0
    """Seconds a fetched view of the DHT is reused before it is fetched again."""
    subspans: bool = True
    """Use part of a node's span when that makes a cheaper route."""
    prefer: frozenset[str] = frozenset()
    """Peer ids to route through whenever they can serve: a route takes as few blocks from other
    peers as it can, then the fastest. Preferred peers are still checked, banned and replaced
    like any other (e.g. a test or a demo that wants a chosen node on the route)."""
    verify_receipts: bool = True
    """Check every node's receipt before using its output. Benchmarks only may turn it off (to
    measure what checking costs): such a client accepts any activation from any node. Nothing
    else, and no environment variable, changes it."""

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise InvalidInput("give at least one initial peer (a multiaddr printed by a node)")
        for name in ("connect_timeout", "open_timeout", "step_timeout", "ping_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} must be positive")
        if self.max_failovers < 0:
            raise InvalidInput("max_failovers must not be negative")


@dataclass
class _View:
    fetched_at: float
    records: list[ServerRecord]


class Swarm:
    """Discovery, liveness and bans, shared by every session of one client."""

    def __init__(self, transport: SwarmTransport, config: ClientConfig) -> None:
        self.transport = transport
        self.config = config
        self.bans = BanList(base_seconds=config.ban_seconds)
        self.rtts: dict[str, float] = {}
        self.trusted: frozenset[bytes] | None = None
        """If set, only nodes with these public keys are used (priority routes)."""
        self._views: dict[bytes, _View] = {}
        self._closed = False

    @classmethod
    async def connect(cls, config: ClientConfig) -> Swarm:
        """Join the swarm through ``config.initial_peers`` over hivemind."""
        transport = await HivemindTransport.connect(config.initial_peers, config.connect_timeout)
        return cls(transport, config)

    async def servers(
        self, model_digest: bytes, num_blocks: int, fresh: bool = False
    ) -> list[ServerRecord]:
        """Every valid, online record of the model's servers (cached for records_ttl)."""
        view = self._views.get(model_digest)
        now = time.monotonic()
        if fresh or view is None or now - view.fetched_at > self.config.records_ttl:
            per_block = await self.transport.fetch_records(model_digest, num_blocks)
            unique = {r.peer_id: r for servers in per_block for r in servers.values()}
            view = _View(now, list(unique.values()))
            self._views[model_digest] = view
        return view.records

    def usable(self, record: ServerRecord) -> bool:
        config = self.config
        return (
            record.state == NodeState.ONLINE
            and not self.bans.is_banned(record.peer_id)
            and (not config.allow or record.peer_id in config.allow)
            and record.peer_id not in config.block
            and (self.trusted is None or record.public_key in self.trusted)
        )

    async def measure(self, records: list[ServerRecord]) -> None:
        """Ping the usable nodes not yet measured; ban the ones that do not answer."""
        todo = [r for r in records if self.usable(r) and r.peer_id not in self.rtts]
        results = await asyncio.gather(*(self._ping(r.peer_id) for r in todo))
        for record, rtt in zip(todo, results, strict=True):
            if rtt is None:
                self.bans.ban(record.peer_id, "did not answer a ping")
            else:
                self.rtts[record.peer_id] = rtt

    async def _ping(self, peer_id: str) -> float | None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.ping_timeout):
                await self.transport.info(peer_id, self.config.ping_timeout)
        except (TimeoutError, CorollaError):
            return None
        return time.perf_counter() - started

    async def route(
        self,
        model_digest: bytes,
        num_blocks: int,
        start: int,
        end: int,
        avoid: frozenset[str] = frozenset(),
    ) -> list[Hop]:
        """The cheapest usable chain over [start, end), through none of ``avoid`` (peers a
        session stopped using); the view is refreshed once if there is none."""
        try:
            return await self._route_once(model_digest, num_blocks, start, end, avoid, fresh=False)
        except RouteUnavailable:
            return await self._route_once(model_digest, num_blocks, start, end, avoid, fresh=True)

    async def _route_once(
        self,
        model_digest: bytes,
        num_blocks: int,
        start: int,
        end: int,
        avoid: frozenset[str],
        *,
        fresh: bool,
    ) -> list[Hop]:
        records = await self.servers(model_digest, num_blocks, fresh=fresh)
        await self.measure(records)
        return find_route(
            records,
            start,
            end,
            rtts=self.rtts,
            usable=lambda record: record.peer_id not in avoid and self.usable(record),
            subspans=self.config.subspans,
            prefer=self.config.prefer,
        )

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.transport.shutdown()
