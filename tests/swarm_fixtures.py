"""Real ``corolla node run`` processes on 127.0.0.1 for tests, always stopped afterwards.

Use the context manager or the pytest fixture::

    from swarm_fixtures import Swarm, node_swarm  # noqa: F401  (node_swarm is a fixture)

    def test_something(node_swarm, tiny_model_dir):
        first = node_swarm.start(tiny_model_dir, blocks="0:2")
        second = node_swarm.start(tiny_model_dir, blocks="2:4")  # joins `first` by default
        ...  # node_swarm.initial_peers, first.peer_id, first.maddr, first.stop(), first.kill()

Each node runs in its own process group (its DHT process and libp2p daemons included) with its
own identity under the swarm's directory; every group is SIGKILLed at exit, whatever happened.
Waits are bounded: a node that does not print ``listening on ...`` in time fails the test with
its output attached.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = ["NodeProcess", "Swarm", "node_swarm"]

LISTENING_PREFIX = "listening on "
_BOOTSTRAP = "from corolla.cli import main; main()"


class NodeProcess:
    """One running node; its output is collected in ``lines``."""

    def __init__(self, name: str, args: list[str], identity: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.identity = identity
        self.lines: list[str] = []
        self.maddr = ""
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith(LISTENING_PREFIX) and not self.maddr:
                self.maddr = line.removeprefix(LISTENING_PREFIX).strip()
                self._ready.set()
        self._ready.set()

    @property
    def peer_id(self) -> str:
        return self.maddr.rsplit("/p2p/", 1)[-1]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or not self.maddr:
            self.kill()
            raise RuntimeError(
                f"node {self.name} did not start within {timeout} s "
                f"(exit code {self.process.poll()}); output:\n{self.output}"
            )

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (a clean withdrawal), then SIGKILL of the group if it takes too long."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()
        self._reader.join(5)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, as far as the swarm can tell)."""
        self._kill_group()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class Swarm:
    """Nodes started by a test; the first one is the initial peer of the others by default."""

    def __init__(self, directory: Path, ready_timeout: float = 90.0) -> None:
        self.directory = Path(directory)
        self.ready_timeout = ready_timeout
        self.nodes: list[NodeProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return [node.maddr for node in self.nodes[:1] if node.maddr]

    def start(
        self,
        model: Path,
        *,
        blocks: str | None = None,
        num_blocks: int | None = None,
        initial_peers: Sequence[str] | None = None,
        adversary: str | None = None,
        extra_args: Sequence[str] = (),
        refresh_period: float = 5.0,
        wait: bool = True,
    ) -> NodeProcess:
        """Start a node (``corolla node run``, or ``corolla simulate node`` with an adversary)."""
        name = f"node{len(self.nodes)}"
        identity = self.directory / f"{name}.key"
        self.directory.mkdir(parents=True, exist_ok=True)
        command = ["node", "run"] if adversary is None else ["simulate", "node"]
        args = [*command, "--model", str(model), "--identity", str(identity)]
        args += ["--refresh-period", str(refresh_period)]
        if adversary is not None:
            args += ["--adversary", adversary]
        if blocks is not None:
            args += ["--blocks", blocks]
        if num_blocks is not None:
            args += ["--num-blocks", str(num_blocks)]
        peers = self.initial_peers if initial_peers is None else list(initial_peers)
        for peer in peers:
            args += ["--initial-peers", peer]
        args += list(extra_args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        node = NodeProcess(name, args, identity, env)
        self.nodes.append(node)
        if wait:
            node.wait_ready(self.ready_timeout)
        return node

    def close(self) -> None:
        """Stop every node: SIGTERM all, give them a moment, then SIGKILL every group."""
        for node in self.nodes:
            if node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(max(0.1, deadline - time.monotonic()))
            node.kill()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def node_swarm(tmp_path: Path) -> Iterator[Swarm]:
    """A :class:`Swarm` in ``tmp_path`` whose nodes are all stopped when the test ends."""
    with Swarm(tmp_path / "swarm") as swarm:
        yield swarm
