"""The swarm as a Backbone: synchronous sessions over the async SwarmSession."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from corolla.client.runtime import BackgroundLoop
from corolla.client.session import SwarmSession
from corolla.client.swarm import Swarm
from corolla.node.manifest import Manifest
from corolla.verify.identity import Identity

__all__ = ["RemoteBackbone", "RemoteSession"]


class RemoteSession:
    """Synchronous face of a SwarmSession (what `generate()` and users step through)."""

    def __init__(self, core: SwarmSession, loop: BackgroundLoop) -> None:
        self.core = core
        self._loop = loop

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._loop.run(self.core.step(hidden))

    @property
    def route(self):
        return self.core.route

    @property
    def work(self):
        return self.core.work

    @property
    def failovers(self):
        return self.core.failovers


class RemoteBackbone:
    """Every block of a model, served by the swarm."""

    def __init__(
        self, swarm: Swarm, manifest: Manifest, identity: Identity, loop: BackgroundLoop
    ) -> None:
        self.swarm = swarm
        self.manifest = manifest
        self.identity = identity
        self._loop = loop
        self.last_session: RemoteSession | None = None

    @contextmanager
    def inference_session(self, batch_size: int, max_length: int) -> Iterator[RemoteSession]:
        core = SwarmSession(self.swarm, self.manifest, self.identity, batch_size, max_length)
        session = RemoteSession(core, self._loop)
        self.last_session = session
        try:
            self._loop.run(core.open())
            yield session
        finally:
            self._loop.run(core.close(), timeout=30)
