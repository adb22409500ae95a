"""Durability: SIGKILL the ledger in the middle of a burst of concurrent writes, restart it,
and every acknowledged write is there, nothing is half-written, and the audit passes. Twenty
rounds on one database."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import httpx
from ledger_fixtures import (
    LedgerServer,
    check,
    declare_over_http,
    make_pairs,
    seed_identity,
    wait_for_next_beacon,
)

from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.reports import report_body
from corolla.ledger.audit import audit
from corolla.ledger.reader import LedgerReader
from corolla.ledger.sources import DbSource
from corolla.verify.beacon import Beacon
from corolla.verify.checkpoints import Checkpoint
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity
from corolla.verify.merkle import verify_consistency

ROUNDS = 20
WRITERS = 6
VERIFIER = seed_identity("verifier")
"""Declares serving in the first round: the assigned verifier of every check after that."""


def burst(
    url: str,
    acknowledged: list[tuple[bytes, dict[str, Any]]],
    enough: threading.Event,
    target: int,
    stop: threading.Event,
    beacon: Beacon,
) -> None:
    """Submit small signed, checked reports until the server dies; record every 200 answer."""
    client_id, node = Identity.generate(), Identity.generate()
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            pairs = make_pairs(client_id, node, steps=2, prefill=3)
            body = report_body(pairs, [check(client_id, VERIFIER, pairs, beacon)])
            data = canonical(body)
            envelope = sign_envelope(client_id, "report", data)
            try:
                response = http.post("/v1/reports", json=body, headers=envelope.to_headers())
            except httpx.HTTPError:
                return  # the server was killed under us
            if response.status_code == 200:
                acknowledged.append((envelope.digest(), response.json()))
                if len(acknowledged) >= target:
                    enough.set()


def check_round(db: Path, acknowledged: list[tuple[bytes, dict[str, Any]]]) -> int:
    """Every acknowledged operation's entries are in the log, the log extends every checkpoint
    the ledger acknowledged, and the audit of the recovered database passes."""
    reader = LedgerReader.open(db)
    try:
        size = reader.size()
        for op_digest, result in acknowledged:
            assert result["entries"], "an acknowledged credit must have entries"
            for seq in result["entries"]:
                entries = reader.entries(seq, 1)
                assert entries and entries[0].seq == seq, f"acknowledged entry {seq} was lost"
                assert entries[0].op_digest == op_digest, f"entry {seq} is another operation's"
            acked = Checkpoint.from_dict(result["checkpoint"])
            assert acked.tree_size <= size
            proof = reader.consistency_proof(acked.tree_size, size)
            verify_consistency(acked.tree_size, size, acked.root_hash, reader.root(size), proof)
    finally:
        reader.close()
    source = DbSource(db)
    try:
        report = audit(source)
    finally:
        source.close()
    assert report.cached_state_compared
    return size


def test_every_acknowledged_write_survives_sigkill_mid_burst_twenty_times(tmp_path: Path) -> None:
    db, key = tmp_path / "ledger.db", tmp_path / "ledger.key"
    rng = random.Random(20240601)
    sizes = []
    killed_with_writes_in_flight = 0
    for round_number in range(ROUNDS):
        server = LedgerServer(db, key)
        with LedgerClient(server.url) as ledger:
            if round_number == 0:
                declare_over_http(server.url, VERIFIER)
                wait_for_next_beacon(ledger)
            beacon = ledger.beacon()
        acknowledged: list[tuple[bytes, dict[str, Any]]] = []
        enough, stop = threading.Event(), threading.Event()
        target = rng.randint(3, 12)
        writers = [
            threading.Thread(
                target=burst, args=(server.url, acknowledged, enough, target, stop, beacon)
            )
            for _ in range(WRITERS)
        ]
        try:
            for writer in writers:
                writer.start()
            assert enough.wait(timeout=60), "the burst never got going"
            alive = sum(writer.is_alive() for writer in writers)
            server.kill()
            killed_with_writes_in_flight += alive > 0
        finally:
            stop.set()
            server.kill()
            for writer in writers:
                writer.join(timeout=30)
        sizes.append(check_round(db, list(acknowledged)))
    assert killed_with_writes_in_flight == ROUNDS
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
