"""Real `corolla node run` processes on 127.0.0.1 for tests, always stopped afterwards.

The launcher itself is library code (`corolla.simulations.live`, shared with `corolla demo` and
the benchmarks); this module gives tests its names and a fixture::

    from swarm_fixtures import Swarm, node_swarm  # noqa: F401  (node_swarm is a fixture)

    def test_something(node_swarm, bloom_dir):
        first = node_swarm.start(bloom_dir, blocks="0:2")
        second = node_swarm.start(bloom_dir, blocks="2:4")  # joins `first` by default
        ...  # node_swarm.initial_peers, first.peer_id, first.maddr, first.stop(), first.kill()
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corolla.simulations.live import LISTENING_PREFIX, NodeProcess
from corolla.simulations.live import LocalSwarm as Swarm

__all__ = ["LISTENING_PREFIX", "NodeProcess", "Swarm", "node_swarm"]


@pytest.fixture
def node_swarm(tmp_path: Path) -> Iterator[Swarm]:
    """A swarm in `tmp_path` whose nodes are all stopped when the test ends."""
    with Swarm(tmp_path / "swarm") as swarm:
        yield swarm
