"""Start real `corolla node run` processes on this machine, and always stop them.

Used by `corolla demo`, the benchmarks and the tests. Each node runs in its own process group
(its guard, DHT process and libp2p daemon included), so stopping it leaves nothing behind:
SIGTERM first (a clean withdrawal from the DHT, about a second), then, past the timeout, SIGKILL
of the whole group, waiting (bounded) until no process of the group runs. A node whose main
process alone is killed takes its helpers with it (:mod:`corolla.node.lifeline`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from corolla.errors import NodeUnavailable

__all__ = ["LISTENING_PREFIX", "LocalSwarm", "NodeProcess", "group_members"]

LISTENING_PREFIX = "listening on "
_BOOTSTRAP = "from corolla.cli import main; main()"
COROLLA_PROGRAM: tuple[str, ...] = (sys.executable, "-c", _BOOTSTRAP)


def group_members(pgid: int) -> list[int]:
    """Pids of the running (not zombie) processes of process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                state, _ppid, group = stat.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state not in (b"Z", b"X"):
            members.append(int(name))
    return members


class NodeProcess:
    """One running node; its output is collected in `lines`."""

    def __init__(
        self,
        name: str,
        args: list[str],
        identity: Path,
        env: dict[str, str],
        program: Sequence[str] = COROLLA_PROGRAM,
    ) -> None:
        self.name = name
        self.args = args
        self.identity = identity
        self.lines: list[str] = []
        self.maddr = ""
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [*program, *args],
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
        if self.process.stdout is None:
            return
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
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
            raise NodeUnavailable(
                f"node {self.name} did not start within {timeout:g} s "
                f"(exit code {self.process.poll()}); its output:\n{self.output}"
            )

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean withdrawal), then SIGKILL of the group if it takes too long."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill()
        self._reader.join(5)
        return self.process.returncode

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole process group at once (a crash, as far as the swarm can tell) and
        wait, up to ``timeout`` seconds, until none of its processes runs."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


class LocalSwarm:
    """Nodes started on this machine; the first one running is the others' initial peer."""

    def __init__(self, directory: Path, ready_timeout: float = 90.0) -> None:
        self.directory = Path(directory)
        self.ready_timeout = ready_timeout
        self.nodes: list[NodeProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        """The multiaddr of the first node still running (the others' way in)."""
        live = [node.maddr for node in self.nodes if node.maddr and node.process.poll() is None]
        return live[:1]

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
        env: dict[str, str] | None = None,
        program: Sequence[str] = COROLLA_PROGRAM,
    ) -> NodeProcess:
        """Start a node (`corolla node run`, or `corolla simulate node` with an adversary).

        ``program`` is the command line the node's arguments follow (``corolla`` by default; a
        benchmark passes ``benchmarks/unsigned.py``'s, which takes the same ``node run ...``).
        """
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
        node_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        node = NodeProcess(name, args, identity, node_env, program)
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

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
