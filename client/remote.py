"""The swarm as a Backbone: synchronous sessions over the async SwarmSession."""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from corolla.client.check_ledger import CheckLedger, CheckRules
from corolla.client.generation import Draw, TokenRange
from corolla.client.head_rule import Logits
from corolla.client.routing import Hop
from corolla.client.runtime import BackgroundLoop
from corolla.client.session import SwarmSession
from corolla.client.session_log import SessionLog
from corolla.client.signer import Signer
from corolla.client.spotcheck import SpotCheckConfig, SpotChecker
from corolla.client.swarm import Swarm
from corolla.node.model.manifest import Manifest
from corolla.node.protocol.messages import NodeInfo
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

    def drew(self, draw: Draw) -> None:
        self.core.drew(draw)

    def unverified(self) -> tuple[TokenRange, ...]:
        return self.core.unverified()

    @property
    def route(self) -> list[Hop]:
        return self.core.route

    @property
    def log(self) -> SessionLog:
        """What happened so far: verified work, spot-checks, rewinds, failovers, priority."""
        return self.core.log


class RemoteBackbone:
    """Every block of a model, served by the swarm.

    ``checks`` sets the spot-checks (None: off); ``ledger`` assigns their verifiers and judges
    their disputes (None: the client draws verifiers itself and nobody judges); ``rules`` are
    the thresholds and honest floors of the model (the profiles' defaults if None); ``logits``
    is the client's head, for the head rule (no head rule if None).
    """

    def __init__(
        self,
        swarm: Swarm,
        manifest: Manifest,
        identity: Signer,
        loop: BackgroundLoop,
        checks: SpotCheckConfig | None = None,
        ledger: CheckLedger | None = None,
        rules: CheckRules | None = None,
        logits: Logits | None = None,
    ) -> None:
        self.swarm = swarm
        self.checker = (
            SpotChecker(swarm, manifest, identity.public_key, checks, rules, ledger)
            if checks is not None
            else None
        )
        self.logits = logits
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
        return self.run(self.swarm.transport.info(peer_id, timeout))

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
            self.logits,
        )
        session = RemoteSession(core, self._loop)
        self.last_session = session
        try:
            self._loop.run(core.open())
            yield session
        finally:
            self._loop.run(core.close(), timeout=30)
