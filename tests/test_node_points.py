"""`corolla node run --ledger URL`: the node shows the points it earns, live, against a real ledger
server; a ledger that is down is a warning line, never the node's end."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from ledger_fixtures import earn, free_port, running_server
from swarm_fixtures import Swarm

import corolla.simulations.ledger_process as ledger_process
from corolla.cli import main
from corolla.ledger.api.client import AsyncLedgerClient, ClientConfig, LedgerClient
from corolla.node.balance_watch import POINTS_PREFIX, PointsWatcher
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.records import RecordValidator
from corolla.node.protocol.stream import request_info
from corolla.verify.identity import Identity, load_identity

pytestmark = pytest.mark.timeout(240)


def _credited(url: str, node: Identity, steps: int = 3) -> int:
    """A client reports a session of ``node``'s that a verifier checked: the ledger credits the
    node. Returns the node's new balance."""
    earn(url, Identity.generate(), node, steps=steps)
    with LedgerClient(url) as ledger:
        return ledger.balance(node.public_key)


async def _credit(url: str, node: Identity, steps: int = 3) -> int:
    return await asyncio.to_thread(_credited, url, node, steps)


async def test_the_watcher_prints_the_balance_each_change_and_one_warning_per_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    node = Identity.generate()
    port = free_port()
    # The ledger comes up on that port (corolla.simulations.ledger_process starts it).
    monkeypatch.setattr(ledger_process, "free_port", lambda: port)
    out = io.StringIO()
    watcher = PointsWatcher(f"http://127.0.0.1:{port}", node.public_key, period=1.0, out=out)

    def lines() -> list[str]:
        return out.getvalue().splitlines()

    async with AsyncLedgerClient(watcher.url, config=ClientConfig(attempts=1)) as ledger:
        assert await watcher.poll(ledger) is None  # nothing listens yet
        assert len(lines()) == 1 and lines()[0].startswith("warning: ledger http://127.0.0.1")
        await watcher.poll(ledger)
        assert len(lines()) == 1  # one line per outage
        with running_server(tmp_path / "ledger.db", tmp_path / "ledger.key") as server:
            assert await watcher.poll(ledger) == 0
            assert lines()[-1] == f"{POINTS_PREFIX}0 (ledger reachable again)"
            earned = await _credit(server.url, node)
            assert earned > 0
            assert await watcher.poll(ledger) == earned
            assert lines()[-1] == f"{POINTS_PREFIX}{earned} (+{earned})"
            await watcher.poll(ledger)
            assert len(lines()) == 3  # no change, no line
            more = await _credit(server.url, node)
            await watcher.poll(ledger)
            assert lines()[-1] == f"{POINTS_PREFIX}{more} (+{more - earned})"
        assert await watcher.poll(ledger) is None
        assert lines()[-1].startswith("warning: ledger") and len(lines()) == 5


def _reader(initial_peers: list[str]) -> DHT:
    return DHT(
        initial_peers=initial_peers,
        start=True,
        client_mode=True,
        record_validators=[RecordValidator()],
        **p2p_options(),
    )


def _wait_for_line(node, predicate, tries: int = 400) -> str:
    for _ in range(tries):
        found = [line for line in list(node.lines) if predicate(line)]
        if found:
            return found[-1]
        if node.process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no such line; the node's output:\n{node.output}")


def test_a_node_with_a_ledger_shows_the_points_it_earns_live(bloom_dir: Path, tmp_path: Path):
    with (
        running_server(tmp_path / "ledger.db", tmp_path / "ledger.key") as server,
        Swarm(tmp_path / "swarm") as swarm,
    ):
        node = swarm.start(
            bloom_dir, blocks="0:2", refresh_period=0.5, extra_args=["--ledger", server.url]
        )
        assert _wait_for_line(node, lambda line: line.startswith(POINTS_PREFIX)) == "points: 0"
        earned = _credited(server.url, load_identity(node.identity), steps=4)
        line = _wait_for_line(
            node, lambda line: line.startswith("points: ") and line != "points: 0"
        )
        assert line == f"{POINTS_PREFIX}{earned} (+{earned})"
        assert node.stop() == 0


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    """Wait until `condition()` holds; AssertionError after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition never held in {seconds:g} s")
        await asyncio.sleep(0.05)


async def test_a_simulated_node_whose_ledger_is_down_warns_once_and_serves(
    bloom_dir: Path, tmp_path: Path
):
    # The ledger's port is bound but not listening, so the node's requests are refused. Once
    # the node has warned, the port listens, reads each request and drops it unanswered: the
    # ledger stays down, and the test sees the node go on polling it.
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    down = f"http://127.0.0.1:{dead.getsockname()[1]}"
    paths: list[str] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            paths.append(head.split(b" ", 2)[1].decode())
        writer.close()

    with dead, Swarm(tmp_path / "swarm") as swarm:
        node = swarm.start(
            bloom_dir,
            blocks="0:2",
            adversary="honest",
            refresh_period=0.5,
            extra_args=["--ledger", down],
        )
        warning = await asyncio.to_thread(
            _wait_for_line, node, lambda line: line.startswith("warning: ledger")
        )
        assert down in warning
        balance = f"/v1/accounts/{load_identity(node.identity).public_key.hex()}"
        server = await asyncio.start_server(drop, sock=dead)
        try:  # a few more polls of the dead ledger
            await _until(lambda: paths.count(balance) >= 3, seconds=60)
        finally:
            server.close()
            await server.wait_closed()
        dht = await asyncio.to_thread(_reader, swarm.initial_peers)
        try:
            p2p = await dht.replicate_p2p()
            info = await request_info(p2p, PeerID.from_base58(node.peer_id))
            await p2p.shutdown()
        finally:
            await asyncio.to_thread(dht.shutdown)
        assert (info.start, info.end) == (0, 2)
        assert node.process.poll() is None
        assert sum(line.startswith("warning: ledger") for line in node.lines) == 1
        assert not any(line.startswith(POINTS_PREFIX) for line in node.lines)
        assert node.stop() == 0


def test_a_ledger_url_that_is_not_http_is_a_one_line_error(bloom_dir, tmp_path, capsys):
    argv = ["node", "run", "--model", str(bloom_dir), "--identity", str(tmp_path / "k")]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--blocks", "0:2", "--ledger", "ftp://ledger.example"])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "--ledger must be an http" in stderr and "Traceback" not in stderr
