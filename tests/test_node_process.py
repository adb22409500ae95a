"""`corolla node run` as a process: announce, pick a span, withdraw on signals, bad options."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import signal
import subprocess
import sys

import pytest
import torch
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from swarm_fixtures import Swarm

from corolla.cli import main
from corolla.errors import BadReceipt, BadSignature
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import load_manifest
from corolla.node.protocol.messages import OpenSession, StepMessage
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.records import NodeState, RecordValidator, ServerRecord, fetch_records
from corolla.node.protocol.stream import InferenceStream
from corolla.node.run_cli import NodeOptions, run
from corolla.simulations.node_cli import SimulatedNodeOptions
from corolla.simulations.node_cli import node as simulate_node
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request, verify_receipt
from corolla.version import PROTOCOL_VERSION

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def node_swarm(tmp_path):
    with Swarm(tmp_path / "swarm") as swarm:
        yield swarm


def _reader(initial_peers: list[str]) -> DHT:
    return DHT(
        **p2p_options(),
        initial_peers=initial_peers,
        start=True,
        client_mode=True,
        record_validators=[RecordValidator()],
    )


async def _records_when(dht, model_digest, num_blocks, ready, include_offline=False, tries=80):
    """Poll the DHT (bounded) until `ready(records)`; return the last view either way."""
    for _ in range(tries):
        blocks = await fetch_records(dht, model_digest, num_blocks, include_offline=include_offline)
        if ready(blocks):
            return blocks
        await asyncio.sleep(0.25)
    return blocks


def _peers(blocks: list[dict[str, ServerRecord]]) -> list[set[str]]:
    return [set(servers) for servers in blocks]


async def test_nodes_announce_pick_the_weakest_span_and_withdraw_on_signals(node_swarm, bloom_dir):
    digest = load_manifest(Checkpoint(bloom_dir)).model_digest
    first = node_swarm.start(bloom_dir, blocks="0:2")
    assert first.maddr.startswith("/ip4/127.0.0.1/tcp/") and first.peer_id in first.maddr
    second = node_swarm.start(bloom_dir, num_blocks=2)  # 0:2 is served: it must take 2:4
    dht = await asyncio.to_thread(_reader, node_swarm.initial_peers)
    try:
        want = [{first.peer_id}] * 2 + [{second.peer_id}] * 2
        blocks = await _records_when(dht, digest, 4, lambda b: _peers(b) == want)
        assert _peers(blocks) == want
        record = blocks[2][second.peer_id]
        assert (record.start, record.end, record.state) == (2, 4, NodeState.ONLINE)
        assert record.throughput > 0 and record.cache_tokens_free > 0

        assert second.stop() == 0  # SIGTERM
        blocks = await _records_when(dht, digest, 4, lambda b: not b[2])
        assert _peers(blocks) == [{first.peer_id}] * 2 + [set(), set()]
        everything = await fetch_records(dht, digest, 4, include_offline=True)
        assert [r.state for r in everything[2].values()] in ([], [NodeState.OFFLINE])

        first.process.send_signal(signal.SIGINT)
        assert first.process.wait(30) == 0
        assert "withdrawn" in first.output
    finally:
        await asyncio.to_thread(dht.shutdown)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks", "0:99"], "outside the model"),
        (["--blocks", "2"], "START:END"),
        ([], "exactly one of --blocks"),
        (["--blocks", "0:2", "--num-blocks", "2"], "exactly one of --blocks"),
        (["--blocks", "0:2", "--quant", "fp3"], "--quant"),
        (["--blocks", "0:2", "--initial-peers", "nonsense"], "multiaddr"),
        (["--blocks", "0:2", "--max-cache-tokens", "-1"], "--max-cache-tokens"),
    ],
)
@pytest.mark.parametrize("command", [["node", "run"], ["simulate", "node", "--adversary", "noise"]])
def test_bad_options_are_one_line_errors(bloom_dir, tmp_path, capsys, command, args, message):
    argv = [*command, "--model", str(bloom_dir), "--identity", str(tmp_path / "k"), *args]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr


def test_both_node_commands_take_the_node_options_declared_once():
    node_options = {field.name for field in dataclasses.fields(NodeOptions)}
    assert set(inspect.signature(run).parameters) == node_options
    simulated = inspect.signature(simulate_node).parameters
    assert set(simulated) == node_options | {
        "adversary", "perturbation", "cheat_with", "cheat_fraction", "target_client",
        "wrong_model", "wrong_quant", "seed", "accomplice", "target_node", "steer_token",
    }  # fmt: skip
    assert [name for name, p in simulated.items() if p.default is p.empty] == ["model", "adversary"]
    assert not set(SimulatedNodeOptions.__annotations__) & node_options  # adds, redeclares none


def test_missing_model_is_a_one_line_error_from_the_real_command(tmp_path):
    command = [sys.executable, "-c", "from corolla.cli import main; main()", "node", "run"]
    command += ["--model", str(tmp_path / "nothing"), "--blocks", "0:1"]
    command += ["--identity", str(tmp_path / "k")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("adversary", "error"), [("wrong-key", BadSignature), ("bad-digest", BadReceipt)]
)
async def test_simulated_adversary_node_serves_receipts_that_fail_checks(
    node_swarm, bloom_dir, adversary, error
):
    node = node_swarm.start(bloom_dir, blocks="0:2", adversary=adversary)
    assert f"simulated adversary: {adversary}" in node.output
    manifest = load_manifest(Checkpoint(bloom_dir))
    dht = await asyncio.to_thread(_reader, node_swarm.initial_peers)
    try:
        blocks = await _records_when(dht, manifest.model_digest, 2, lambda b: bool(b[0]))
        record = blocks[0][node.peer_id]
        p2p = await dht.replicate_p2p()
        client = Identity.generate()
        session_id = os.urandom(16)
        hidden = torch.randn(1, 3, 64)
        request = sign_request(
            client,
            protocol_version=PROTOCOL_VERSION,
            model_digest=manifest.model_digest,
            span_digest=manifest.span_digest(0, 2),
            start=0,
            end=2,
            session_id=session_id,
            step=0,
            position=0,
            tokens=3,
            input_digest=tensor_digest(hidden),
        )
        async with InferenceStream(p2p, PeerID.from_base58(node.peer_id)) as stream:
            await stream.open(OpenSession(session_id, 1, 16, 0, 2, client.public_key), 30)
            output = await stream.step(StepMessage(request, hidden), 30)
        await p2p.shutdown()
        with pytest.raises(error):
            verify_receipt(
                output.receipt,
                request=request,
                output=output.hidden,
                previous_chain=GENESIS_CHAIN,
                node_key=record.public_key,
            )
    finally:
        await asyncio.to_thread(dht.shutdown)
