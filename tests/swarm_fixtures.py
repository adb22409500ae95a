"""Real `corolla node run` processes on 127.0.0.1 for tests, always stopped afterwards.

The launcher itself is library code (`corolla.simulations.live`, shared with `corolla demo` and
the benchmarks); this module gives tests its names, a fixture, and a pool that several tests of
a module share::

    from swarm_fixtures import Swarm, node_swarm  # noqa: F401  (node_swarm is a fixture)

    def test_something(node_swarm, bloom_dir):
        first = node_swarm.start(bloom_dir, blocks="0:2")
        second = node_swarm.start(bloom_dir, blocks="2:4")  # joins `first` by default
        ...  # node_swarm.initial_peers, first.peer_id, first.maddr, first.stop(), first.kill()

    pool = NodePool(swarm, bloom_dir)
    pool.add({"0:2": 2, "2:4": 2}, adversaries={"hang": "2:4"})  # all started at once
    pool.ensure({"0:2": 2})  # tops up the honest nodes a previous test killed
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from corolla.simulations.live import LISTENING_PREFIX, NodeProcess
from corolla.simulations.live import LocalSwarm as Swarm

__all__ = ["LISTENING_PREFIX", "NodePool", "NodeProcess", "Swarm", "node_swarm"]


@pytest.fixture
def node_swarm(tmp_path: Path) -> Iterator[Swarm]:
    """A swarm in `tmp_path` whose nodes are all stopped when the test ends."""
    with Swarm(tmp_path / "swarm") as swarm:
        yield swarm


@dataclass(frozen=True)
class PoolNode:
    process: NodeProcess
    blocks: str
    adversary: str | None


class NodePool:
    """Nodes of one model that a module's tests share: honest ones per span, and adversaries.

    Starting a node costs seconds of CPU, so a module starts its nodes once, at the same time;
    a test that kills some calls `ensure` first so that the next one finds what it needs.
    """

    def __init__(self, swarm: Swarm, model: Path) -> None:
        self.swarm = swarm
        self.model = model
        self.nodes: list[PoolNode] = []

    def add(
        self, honest: Mapping[str, int], adversaries: Mapping[str, str] | None = None
    ) -> list[NodeProcess]:
        """Start `honest` {blocks: count} and `adversaries` {strategy: blocks}; wait for all.

        The first node of an empty swarm starts alone (the others join through it).
        """
        wanted = [(blocks, None) for blocks, count in honest.items() for _ in range(count)]
        wanted += [(blocks, name) for name, blocks in (adversaries or {}).items()]
        started: list[PoolNode] = []
        for blocks, adversary in wanted:
            wait = not self.swarm.initial_peers
            process = self.swarm.start(self.model, blocks=blocks, adversary=adversary, wait=wait)
            started.append(PoolNode(process, blocks, adversary))
        for node in started:
            node.process.wait_ready(self.swarm.ready_timeout)
        self.nodes += started
        return [node.process for node in started]

    def live(self, blocks: str) -> list[NodeProcess]:
        """The honest nodes serving `blocks` that are still running."""
        return [
            node.process
            for node in self.nodes
            if node.blocks == blocks and node.adversary is None and _running(node.process)
        ]

    def ensure(self, honest: Mapping[str, int]) -> None:
        """Start honest nodes until each span in `honest` has at least that many running."""
        missing = {blocks: count - len(self.live(blocks)) for blocks, count in honest.items()}
        missing = {blocks: count for blocks, count in missing.items() if count > 0}
        if missing:
            self.add(missing)

    def adversary(self, name: str) -> NodeProcess:
        """The pool's node that runs strategy `name`."""
        for node in self.nodes:
            if node.adversary == name:
                return node.process
        raise LookupError(f"the pool has no {name} node")

    def adversaries(self) -> frozenset[str]:
        """Peer ids of every adversary (a client blocks them unless a test wants one)."""
        return frozenset(node.process.peer_id for node in self.nodes if node.adversary)

    def node(self, peer_id: str) -> NodeProcess:
        for node in self.nodes:
            if node.process.peer_id == peer_id:
                return node.process
        raise LookupError(f"no node of the pool has peer id {peer_id}")

    def kill_all(self) -> None:
        """SIGKILL every node's process group at once (a hanging node ignores SIGTERM)."""
        for node in self.nodes:
            node.process.kill()


def _running(process: NodeProcess) -> bool:
    return process.process.poll() is None
