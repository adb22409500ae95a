"""A node's processes from start to end: libp2p kept on this machine by default, a quick stop,
and no helper process outliving the node, whether it is stopped, killed, or its group is."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarm_fixtures import NodeProcess, Swarm

from corolla.simulations.live import group_members

pytestmark = pytest.mark.timeout(240)

LOCAL_ONLY_FLAGS = {"-natPortMap=0", "-autonat=0", "-relay=0", "-autoRelay=0"}
"""How hivemind passes NAT port mapping, AutoNAT, relay and auto-relay switched off to p2pd."""
STOP_DEADLINE = 15.0
"""A bounded wait, not a timing claim: the test prints the times it measures."""
GONE_DEADLINE = 20.0


ROLES = ("first", "second", "default", "killed", "stuck")
"""One node per role, each test taking its own: "first" and "second" are stopped together."""


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, bloom_dir) -> Iterator[dict[str, NodeProcess]]:
    """The module's nodes, started at once (a node's start is seconds of CPU): the first alone,
    the others joining it."""
    with Swarm(tmp_path_factory.mktemp("lifecycle")) as swarm:
        started = {"first": swarm.start(bloom_dir, blocks="0:2")}
        for role in ROLES[1:]:
            started[role] = swarm.start(bloom_dir, blocks="2:4", wait=False)
        for node in started.values():
            node.wait_ready(swarm.ready_timeout)
        yield started


def _stat(pid: int) -> tuple[bytes, int, int] | None:
    """(state, parent pid, start time) of a process, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [part.decode() for part in cmdline.read().split(b"\0") if part]
    except OSError:
        return []


def _descendants(root: int) -> dict[int, int]:
    """Every process below ``root`` now, with its start time (so a reused pid is not it)."""
    stats = {int(name): _stat(int(name)) for name in os.listdir("/proc") if name.isdigit()}
    found: dict[int, int] = {}
    parents = {root}
    while parents:
        children = {pid for pid, st in stats.items() if st and st[1] in parents} - set(found)
        found.update({pid: stats[pid][2] for pid in children if stats[pid]})  # type: ignore[index]
        parents = children
    return found


def _running(processes: dict[int, int]) -> dict[int, str]:
    """Those of ``processes`` (pid: start time) still running, with their names."""
    left = {}
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[0] not in (b"Z", b"X") and stat[2] == started:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as comm:
                left[pid] = comm.read().strip()
    return left


def _wait_until_gone(processes: dict[int, int], deadline: float) -> dict[int, str]:
    end = time.monotonic() + deadline
    while _running(processes) and time.monotonic() < end:
        time.sleep(0.1)
    return _running(processes)


def _kinds(node: NodeProcess, helpers: dict[int, int]) -> set[str]:
    """Which helpers a node has: its guard, its forked DHT process, its libp2p daemon."""
    main = _cmdline(node.process.pid)
    kinds = set()
    for pid in helpers:
        cmdline = _cmdline(pid)
        if cmdline and Path(cmdline[0]).name == "p2pd":
            kinds.add("daemon")
        elif any(part.endswith("lifeline.py") for part in cmdline):
            kinds.add("guard")
        elif cmdline == main:
            kinds.add("dht")
    return kinds


def _daemon_flags(node: NodeProcess) -> set[str]:
    daemons = [
        _cmdline(pid)
        for pid in _descendants(node.process.pid)
        if Path((_cmdline(pid) or [""])[0]).name == "p2pd"
    ]
    assert len(daemons) == 1, f"expected one libp2p daemon under the node, found {daemons}"
    return set(daemons[0][1:])


def test_a_default_node_starts_libp2p_without_nat_mapping_autonat_or_relay(nodes):
    node = nodes["default"]
    flags = _daemon_flags(node)
    assert flags >= LOCAL_ONLY_FLAGS, sorted(flags)
    assert "-hostAddrs=/ip4/127.0.0.1/tcp/0" in flags


def test_nodes_stopped_together_withdraw_and_exit_leaving_nothing(nodes):
    pair = [nodes["first"], nodes["second"]]
    helpers = {node.name: _descendants(node.process.pid) for node in pair}
    began = time.monotonic()
    for node in pair:
        node.process.send_signal(signal.SIGTERM)
    for node in pair:
        assert node.process.wait(STOP_DEADLINE) == 0, node.output
        print(f"{node.name} exited {time.monotonic() - began:.2f} s after SIGTERM")
        assert "withdrawn from the swarm" in node.output
    for node in pair:
        assert _wait_until_gone(helpers[node.name], GONE_DEADLINE) == {}


def test_a_node_whose_main_process_is_killed_leaves_no_process_behind(nodes):
    node = nodes["killed"]
    helpers = _descendants(node.process.pid)
    assert {"guard", "dht", "daemon"} <= _kinds(node, helpers)

    os.kill(node.process.pid, signal.SIGKILL)  # the main process only, not its group
    killed = time.monotonic()
    node.process.wait(10)
    left = _wait_until_gone(helpers, GONE_DEADLINE)
    assert left == {}, f"still running after the node was killed: {left}"
    print(f"every helper gone {time.monotonic() - killed:.2f} s after SIGKILL")
    assert group_members(node.process.pid) == []


def test_the_launcher_kills_the_whole_group_of_a_node_that_does_not_stop_in_time(nodes):
    node = nodes["stuck"]
    helpers = _descendants(node.process.pid)
    assert {"guard", "dht", "daemon"} <= _kinds(node, helpers)

    node.stop(timeout=0.0)  # no time to withdraw: SIGKILL of the group follows at once
    assert node.process.returncode == -signal.SIGKILL
    assert group_members(node.process.pid) == []
    # torch's shared-memory manager leaves the group (it is a daemon) and ends by itself.
    assert _wait_until_gone(helpers, GONE_DEADLINE) == {}
