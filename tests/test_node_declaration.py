"""A node started with --ledger declares what it serves (so checks can be assigned to it) and
withdraws the declaration when it stops; real node process, real ledger."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ledger_fixtures import running_server

from corolla.ledger.api.client import LedgerClient
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import load_manifest
from corolla.simulations.live import LocalSwarm
from corolla.verify.identity import load_identity

pytestmark = pytest.mark.timeout(240)


def _kinds(url: str, key: bytes) -> list[str]:
    with LedgerClient(url) as ledger:
        return [entry.kind for entry in ledger.history(key)]


def _until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.2)


def test_a_node_declares_its_span_and_withdraws_it_when_it_stops(bloom_dir: Path, tmp_path: Path):
    with (
        running_server(tmp_path / "ledger.db", tmp_path / "ledger.key") as server,
        LocalSwarm(tmp_path / "nodes") as swarm,
    ):
        node = swarm.start(bloom_dir, blocks="0:2", extra_args=["--ledger", server.url])
        key = load_identity(node.identity).public_key
        _until(lambda: "serving_declared" in _kinds(server.url, key))
        with LedgerClient(server.url) as ledger:
            epoch = ledger.beacon().epoch
            _until(lambda: ledger.beacon().epoch > epoch, 30.0)  # declared before this epoch
            model = load_manifest(Checkpoint(bloom_dir)).model_digest
            assert key in ledger.servers(model, 0, 2, "fp32", ledger.beacon().epoch)
            assert key not in ledger.servers(model, 0, 2, "int8", ledger.beacon().epoch)
        assert node.stop() == 0
        assert "serving_withdrawn" in _kinds(server.url, key)
