"""The swarm as a Backbone: synchronous sessions over the async SwarmSession."""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from hivemind.p2p import PeerID

from corolla.client.routing import Hop
from corolla.client.runtime import BackgroundLoop
from corolla.client.session import Failover, SwarmSession, WorkRecord
from corolla.client.spotcheck import CheckOutcome, SpotCheckConfig, SpotChecker
from corolla.client.swarm import Swarm
from corolla.node.model.manifest import Manifest
from corolla.node.protocol.messages import NodeInfo
from corolla.node.protocol.stream import request_info
from corolla.verify.identity import Identity
from corolla.verify.tickets import Ticket

__all__ = ["RemoteBackbone", "RemoteSession"]

T = TypeVar("T")


class RemoteSession:
    """Synchronous face of a SwarmSession (what `generate()` and users step through)."""

    def __init__(self, core: SwarmSession, loop: BackgroundLoop) -> None:
        self.core = core
        self._loop = loop

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._loop.run(self.core.step(hidden))

    def finish(self) -> None:
        self._loop.run(self.core.finish())

    @property
    def route(self) -> list[Hop]:
        return self.core.route

    @property
    def work(self) -> list[WorkRecord]:
        return self.core.work

    @property
    def failovers(self) -> list[Failover]:
        return self.core.failovers

    @property
    def checks(self) -> list[CheckOutcome]:
        return self.core.checks

    @property
    def rewinds(self) -> list[CheckOutcome]:
        return self.core.rewinds

    @property
    def granted(self) -> dict[str, str]:
        """Peer id -> the priority its steps ran at last ("high" or "free")."""
        return self.core.granted

    @property
    def priority_notes(self) -> list[str]:
        """Why a node did not (or no longer) honour the session's ticket, one note per cause."""
        return self.core.priority_notes


class RemoteBackbone:
    """Every block of a model, served by the swarm."""

    def __init__(
        self,
        swarm: Swarm,
        manifest: Manifest,
        identity: Identity,
        loop: BackgroundLoop,
        checks: SpotCheckConfig | None = None,
    ) -> None:
        self.swarm = swarm
        self.checker = (
            SpotChecker(swarm, manifest, identity, checks) if checks is not None else None
        )
        self.manifest = manifest
        self.identity = identity
        self._loop = loop
        self.last_session: RemoteSession | None = None
        self.ticket: Ticket | None = None
        """Attached to every session while set (see corolla.client.priority)."""

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop (for swarm queries from synchronous code)."""
        return self._loop.run(coroutine)

    def node_info(self, peer_id: str, timeout: float = 10.0) -> NodeInfo:
        """What a node says of itself (``rpc_info``): span, room, queue, forward time."""
        peer = PeerID.from_base58(peer_id)
        return self.run(request_info(self.swarm.p2p, peer, timeout=timeout))

    @contextmanager
    def inference_session(self, batch_size: int, max_length: int) -> Iterator[RemoteSession]:
        core = SwarmSession(
            self.swarm,
            self.manifest,
            self.identity,
            batch_size,
            max_length,
            self.checker,
            self.ticket,
        )
        session = RemoteSession(core, self._loop)
        self.last_session = session
        try:
            self._loop.run(core.open())
            yield session
        finally:
            self._loop.run(core.close(), timeout=30)
