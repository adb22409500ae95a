"""Ledger throughput, measured in one run on this machine.

Prints:
- receipts credited per second over HTTP (real uvicorn server on 127.0.0.1, every request and
  receipt signature checked, durable commits), with concurrent submitters;
- receipts credited per second in process (``LedgerStore.submit``, same checks, same database
  settings, no HTTP);
- entries audited per second over a log of at least 100,000 entries, reading the database file
  (``corolla ledger audit --db``) and over HTTP (``corolla ledger audit --url``): every leaf
  hash and the Merkle root recomputed, every operation's signature, every receipt and request
  signature behind a credit re-verified, the whole log replayed under its rules.

Run: ``python benchmarks/ledger_throughput.py [--entries 100000] [--http-receipts 20000]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from corolla.ledger.audit import audit
from corolla.ledger.envelope import sign_envelope
from corolla.ledger.reader import LedgerReader
from corolla.ledger.sources import DbSource, HttpSource
from corolla.ledger.store import LedgerStore
from corolla.verify import GENESIS_CHAIN, Identity, make_receipt, sign_request
from corolla.verify.encoding import canonical
from corolla.verify.identity import save_identity, verify_signature
from corolla.verify.merkle import MerkleTree

BATCH = 250  # pairs per signed submission


def session_pairs(client: Identity, node: Identity, steps: int) -> list[dict]:
    """One node-session: a prefill then decode steps, as the API's JSON dicts."""
    session, chain, position, pairs = secrets.token_bytes(16), GENESIS_CHAIN, 0, []
    model, span = secrets.token_bytes(32), secrets.token_bytes(32)
    for step in range(steps):
        tokens = 16 if step == 0 else 1
        request = sign_request(
            client,
            protocol_version=1,
            model_digest=model,
            span_digest=span,
            start=0,
            end=8,
            session_id=session,
            step=step,
            position=position,
            tokens=tokens,
            input_digest=secrets.token_bytes(32),
        )
        receipt = make_receipt(node, request, secrets.token_bytes(32), chain)
        chain, position = receipt.chain_digest, position + tokens
        pairs.append({"request": request.to_dict(), "receipt": receipt.to_dict()})
    return pairs


def workload(count: int, nodes: list[Identity], clients: list[Identity]) -> list[list[dict]]:
    """``count`` pairs in batches; sessions of 25 steps spread over nodes and clients."""
    pairs: list[dict] = []
    index = 0
    while len(pairs) < count:
        pairs += session_pairs(clients[index % len(clients)], nodes[index % len(nodes)], 25)
        index += 1
    pairs = pairs[:count]
    return [pairs[i : i + BATCH] for i in range(0, len(pairs), BATCH)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(db: Path, key: Path, processes: int = 1):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corolla.ledger.server",
            "--db",
            str(db),
            "--key",
            str(key),
            "--port",
            str(port),
            "--workers",
            str(processes),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/info", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("ledger server did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def credit_over_http(url: str, batches: list[list[dict]], node: Identity, workers: int) -> float:
    """Receipts per second: ``workers`` threads post signed batches, as nodes would."""
    bodies = [{"pairs": batch} for batch in batches]
    prepared = [(canonical(body), json.dumps(body).encode()) for body in bodies]
    queue = list(range(len(prepared)))
    lock = threading.Lock()
    credited = [0]

    def work() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    index = queue.pop()
                data, content = prepared[index]
                headers = {
                    **sign_envelope(node, "work", data).to_headers(),
                    "content-type": "application/json",
                }
                response = http.post("/v1/work", content=content, headers=headers)
                response.raise_for_status()
                units = sum(1 for p in response.json()["pairs"] if p["credited_units"])
                with lock:
                    credited[0] += units

    started = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    total = sum(len(batch) for batch in batches)
    if credited[0] != total:
        raise RuntimeError(f"credited {credited[0]} of {total} receipts")
    return total / elapsed


def credit_in_process(store: LedgerStore, batches: list[list[dict]], node: Identity) -> float:
    bodies = [({"pairs": batch}, canonical({"pairs": batch})) for batch in batches]
    started = time.perf_counter()
    for body, data in bodies:
        store.submit(sign_envelope(node, "work", data), body)
    return sum(len(batch) for batch in batches) / (time.perf_counter() - started)


def components(db: Path, size: int, audit_elapsed: float) -> None:
    """Where an audit's time goes, measured on the same log."""
    reader = LedgerReader.open(db)
    started = time.perf_counter()
    entries = [entry for start in range(0, size, 5000) for entry in reader.entries(start, 5000)]
    leaves = [entry.leaf_hash() for entry in entries]
    leaf_rate = size / (time.perf_counter() - started)
    started = time.perf_counter()
    MerkleTree(leaves).root()
    root_rate = size / (time.perf_counter() - started)
    reader.close()
    identity, message = Identity.generate(), secrets.token_bytes(32)
    signature = identity.sign(message)
    started = time.perf_counter()
    for _ in range(5000):
        verify_signature(identity.public_key, message, signature)
    verify_rate = 5000 / (time.perf_counter() - started)
    ceiling = verify_rate * (os.cpu_count() or 1) / 2
    print(
        f"  of which: read + recompute leaf hashes {leaf_rate:,.0f} entries/s; Merkle root "
        f"from scratch {root_rate:,.0f} leaves/s; Ed25519 {verify_rate:,.0f} verifications/s "
        f"per core, so re-verifying 2 signatures per receipt caps an audit of receipt "
        f"credits at {ceiling:,.0f} entries/s on {os.cpu_count()} cores before any other work "
        f"(this audit: {size / audit_elapsed / ceiling:.0%} of that ceiling)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--http-receipts", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    ledger = Identity.generate()
    key = directory / "ledger.key"
    save_identity(ledger, key)
    nodes = [Identity.generate() for _ in range(16)]
    clients = [Identity.generate() for _ in range(64)]
    submitter = Identity.generate()
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
        f"batches of {BATCH} pairs; synchronous=FULL (WAL)"
    )

    started = time.perf_counter()
    http_batches = workload(args.http_receipts, nodes, clients)
    print(
        f"signed {args.http_receipts} (request, receipt) pairs in "
        f"{time.perf_counter() - started:.1f} s (not timed below)"
    )
    half = len(http_batches) // 2
    with server(directory / "http1.db", key, processes=1) as url:
        single = credit_over_http(url, http_batches[:half], submitter, args.workers)
    print(
        f"HTTP, 1 server process, {args.workers} submitters: {single:,.0f} receipts credited/s "
        f"(target 2,000) -> {single / 2000:.2f}x target"
    )
    with server(directory / "http.db", key, processes=os.cpu_count() or 1) as url:
        http_rate = credit_over_http(url, http_batches[half:], submitter, args.workers)
    print(
        f"HTTP, {os.cpu_count()} server processes (--workers), {args.workers} submitters: "
        f"{http_rate:,.0f} receipts credited/s (target 2,000) -> {http_rate / 2000:.2f}x target; "
        f"{http_rate / single:.2f}x one process"
    )

    store = LedgerStore(directory / "log.db", ledger)
    in_process = credit_in_process(store, http_batches, submitter)
    print(
        f"in process: {in_process:,.0f} receipts credited/s "
        f"(HTTP reaches {http_rate / in_process:.0%} of it)"
    )
    # Grow the same log past the requested size (credits, reputation, registrations).
    size = store._reader.size()
    while size < args.entries:
        more = workload(min(20_000, args.entries - size + BATCH), nodes, clients)
        credit_in_process(store, more, submitter)
        size = store._reader.size()
    store.close()
    print(f"log: {size:,} entries")

    started = time.perf_counter()
    source = DbSource(directory / "log.db")
    report = audit(source)
    source.close()
    db_elapsed = time.perf_counter() - started
    print(
        f"audit --db: {report.tree_size:,} entries, {report.pairs_verified:,} receipts "
        f"re-verified in {db_elapsed:.1f} s: {report.tree_size / db_elapsed:,.0f} entries/s "
        f"(target 20,000) -> {report.tree_size / db_elapsed / 20000:.2f}x target"
    )
    components(directory / "log.db", report.tree_size, db_elapsed)
    with server(directory / "log.db", key) as url:
        started = time.perf_counter()
        source = HttpSource(url)
        report = audit(source)
        source.close()
        http_elapsed = time.perf_counter() - started
    print(
        f"audit --url: {report.tree_size:,} entries in {http_elapsed:.1f} s: "
        f"{report.tree_size / http_elapsed:,.0f} entries/s"
    )


if __name__ == "__main__":
    main()
