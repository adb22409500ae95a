"""`corolla generate --initial-peers` against real nodes: output, receipts file, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.verify.receipts import Receipt, StepRequest, verify_receipt, verify_request


def corolla(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `corolla` command in a fresh process (this environment, plus `env`)."""
    return subprocess.run(
        [sys.executable, "-m", "corolla", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})},
        check=False,
    )


def test_generate_through_the_swarm_prints_json_and_writes_verified_receipts(
    bloom_dir: Path, tmp_path: Path
):
    receipts = tmp_path / "receipts.jsonl"
    with Swarm(tmp_path / "swarm") as swarm:
        for blocks in ("0:2", "2:4", "2:4"):
            swarm.start(bloom_dir, blocks=blocks)
        result = corolla(
            "generate", "--model", str(bloom_dir), "--initial-peers", swarm.initial_peers[0],
            "--identity", str(tmp_path / "client.key"), "--max-new-tokens", "12", "--no-eos",
            "--check-rate", "1", "--receipts", str(receipts), "--json", "Hello swarm",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    head = load_head(bloom_dir)
    prompt = torch.tensor([output["prompt_token_ids"]])
    local = generate(
        head,
        LocalBackbone.load(bloom_dir, [(0, 4)]),
        prompt,
        GenerationConfig(max_new_tokens=12, stop_at_eos=False),
    )
    assert output["token_ids"] == local[0].tolist()
    assert [hop["blocks"] for hop in output["swarm"]["route"]] == [[0, 2], [2, 4]]
    assert output["swarm"]["verified_receipts"] == 24
    verdicts = {check["verdict"] for check in output["swarm"]["spot_checks"]}
    assert "passed" in verdicts and "caught" not in verdicts
    lines = receipts.read_text().splitlines()
    assert len(lines) == 24
    for line in lines:
        record = json.loads(line)
        request = StepRequest.from_dict(record["request"])
        receipt = Receipt.from_dict(record["receipt"])
        verify_request(request)
        verify_receipt(
            receipt, request=request, output_digest=receipt.output_digest,
            previous_chain=_chain_of(lines, record),
        )  # fmt: skip


def _chain_of(lines: list[str], record: dict) -> bytes:
    """The chain digest of the step before `record` on the same node (genesis for step 0)."""
    step = record["request"]["step"]
    if step == 0:
        return bytes(32)
    for line in lines:
        other = json.loads(line)
        if other["peer_id"] == record["peer_id"] and other["request"]["step"] == step - 1:
            return bytes.fromhex(other["receipt"]["chain_digest"])
    raise AssertionError("missing previous step")


DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWJkUvqiYwfD2JqTCbGtRFNokLQEohUkV2xe7UX9rZALbU"


def test_an_unreachable_swarm_is_a_one_line_error(bloom_dir: Path, tmp_path: Path):
    result = corolla(
        "generate", "--model", str(bloom_dir), "--identity", str(tmp_path / "k"),
        "--initial-peers", DEAD_PEER, "hi",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_malformed_initial_peer_is_a_one_line_error(bloom_dir: Path, tmp_path: Path):
    result = corolla(
        "generate", "--model", str(bloom_dir), "--identity", str(tmp_path / "k"),
        "--initial-peers", "not-a-multiaddr", "hi",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
