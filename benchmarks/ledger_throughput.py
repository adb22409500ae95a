"""Ledger throughput, measured in one run on this machine.

Prints:
- receipts credited per second over HTTP (real uvicorn server on 127.0.0.1; clients report
  sessions of 25 steps, each checked by its assigned verifier (checks v2: a signed verdict, the
  recomputation's request and receipt, the ledger's beacon; the assignment re-derived among 16
  declared verifiers); every receipt, verdict, recomputation and beacon signature checked,
  durable commits), with concurrent submitters;
- receipts credited per second in process (``LedgerStore.submit``, same checks, same database
  settings, no HTTP);
- entries audited per second over a log of at least 100,000 entries, reading the database file
  (``corolla ledger audit --db``) and over HTTP (``corolla ledger audit --url``): every leaf
  hash and the Merkle root recomputed, every operation's signature, every receipt and
  attestation signature behind a credit or a fee re-verified, the whole log replayed under its
  rules.

Run: ``python benchmarks/ledger_throughput.py [--entries 100000] [--http-receipts 20000]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from corolla.ledger.api.checks import Serving
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.reports import Attestation, report_body
from corolla.ledger.audit import audit
from corolla.ledger.config import LedgerRules
from corolla.ledger.entries import raw_leaf_hash
from corolla.ledger.reader import LedgerReader
from corolla.ledger.sources import DbSource, HttpSource
from corolla.ledger.store import DEFAULT_ORIGIN, LedgerStore
from corolla.verify import GENESIS_CHAIN, Identity, make_receipt, sign_request
from corolla.verify.assignment import assignment_seed, within_reach
from corolla.verify.beacon import Beacon, epoch_of, sign_beacon
from corolla.verify.encoding import canonical
from corolla.verify.identity import save_identity, verify_signature
from corolla.verify.merkle import MerkleTree
from corolla.verify.receipts import Receipt, StepRequest
from corolla.verify.verdicts import CheckVerdict, sign_verdict

BATCH = 250  # pairs per signed report: 10 sessions of 25 steps
SESSION = 25
PERIOD = 1  # seconds per beacon epoch
MODEL, SPAN = secrets.token_bytes(32), secrets.token_bytes(32)
SERVING = Serving(MODEL, 0, 8, "fp32")


def session_report(
    client: Identity, node: Identity, verifiers: dict[bytes, Identity], beacon: Beacon
) -> tuple[list[tuple[StepRequest, Receipt]], Attestation]:
    """One node-session, a prefill then decode steps, and its assigned verifier's passed check
    of it (the first trusted candidate the beacon draws among ``verifiers``)."""
    session, chain, position, pairs = secrets.token_bytes(16), GENESIS_CHAIN, 0, []
    model, span = MODEL, SPAN
    for step in range(SESSION):
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
        pairs.append((request, receipt))
    recomputation = sign_request(
        client,
        protocol_version=1,
        model_digest=model,
        span_digest=span,
        start=0,
        end=8,
        session_id=secrets.token_bytes(16),
        step=0,
        position=0,
        tokens=position,
        input_digest=secrets.token_bytes(32),
    )
    seed = assignment_seed(beacon, node.public_key, session, 0, 8, SESSION, chain)
    excluded = (node.public_key, client.public_key)
    verifier = verifiers[within_reach(seed, verifiers, excluded, lambda _: True)[0]]
    receipt = make_receipt(verifier, recomputation, secrets.token_bytes(32), GENESIS_CHAIN)
    verdict = CheckVerdict(
        verifier_key=verifier.public_key,
        client_key=client.public_key,
        node_key=node.public_key,
        model_digest=model,
        span_digest=span,
        node_chain=chain,
        recomputation_digest=receipt.digest(),
        session_id=session,
        start=0,
        end=8,
        first_step=0,
        end_step=SESSION,
        first_position=0,
        end_position=position,
        beacon_epoch=beacon.epoch,
        recomputed_positions=position,
        profile="fp32",
        score="1e-06",
        threshold="0.001",
        passed=True,
        signature=bytes(64),
    )
    check = Attestation(sign_verdict(verifier, verdict), recomputation, receipt, beacon)
    return pairs, check


def workload(
    count: int, nodes: list[Identity], clients: list[Identity], beacon: Beacon
) -> list[tuple[Identity, dict]]:
    """About ``count`` pairs as reports of ``BATCH`` pairs, each by one client: sessions spread
    over nodes, each checked by its assigned verifier among the nodes."""
    verifiers = {node.public_key: node for node in nodes}
    reports: list[tuple[Identity, dict]] = []
    index = 0
    while len(reports) * BATCH < count:
        client = clients[len(reports) % len(clients)]
        pairs, checks = [], []
        for _ in range(BATCH // SESSION):
            node = nodes[index % len(nodes)]
            session, check = session_report(client, node, verifiers, beacon)
            pairs += session
            checks.append(check)
            index += 1
        reports.append((client, report_body(pairs, checks)))
    return reports


def declare_in_process(store: LedgerStore, nodes: list[Identity]) -> None:
    body = SERVING.to_body()
    for node in nodes:
        store.submit(sign_envelope(node, "serving", canonical(body)), body)


def declare_over_http(url: str, nodes: list[Identity]) -> None:
    for node in nodes:
        with LedgerClient(url, node) as ledger:
            ledger.declare_serving(MODEL, SERVING.start, SERVING.end, SERVING.profile)


def next_beacon(ledger: Identity) -> Beacon:
    """The beacon of the next epoch, once it began (every ledger here has the same key, origin
    and period, so the same beacons): everything declared so far precedes it."""
    epoch = epoch_of(time.time(), PERIOD) + 1
    while epoch_of(time.time(), PERIOD) < epoch:
        time.sleep(0.05)
    return sign_beacon(ledger, DEFAULT_ORIGIN, PERIOD, epoch)


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
            "corolla.ledger_server",
            "--db",
            str(db),
            "--key",
            str(key),
            "--port",
            str(port),
            "--workers",
            str(processes),
            "--beacon-period-s",
            str(PERIOD),
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


def credit_over_http(url: str, reports: list[tuple[Identity, dict]], workers: int) -> float:
    """Receipts per second: ``workers`` threads post signed reports, as clients would."""
    prepared = [(client, canonical(body), json.dumps(body).encode()) for client, body in reports]
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
                client, data, content = prepared[index]
                headers = {
                    **sign_envelope(client, "report", data).to_headers(),
                    "content-type": "application/json",
                }
                response = http.post("/v1/reports", content=content, headers=headers)
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
    total = sum(len(body["pairs"]) for _, body in reports)
    if credited[0] != total:
        raise RuntimeError(f"credited {credited[0]} of {total} receipts")
    return total / elapsed


def credit_in_process(store: LedgerStore, reports: list[tuple[Identity, dict]]) -> float:
    bodies = [(client, body, canonical(body)) for client, body in reports]
    started = time.perf_counter()
    for client, body, data in bodies:
        store.submit(sign_envelope(client, "report", data), body)
    return sum(len(body["pairs"]) for _, body, _ in bodies) / (time.perf_counter() - started)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the audit's worker processes)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def components(db: Path, size: int, signatures: int, audit_elapsed: float) -> None:
    """Where an audit's time goes, measured on the same log."""
    reader = LedgerReader.open(db)
    started = time.perf_counter()
    rows = [row for start in range(0, size, 5000) for row in reader.raw_entries(start, 5000)]
    leaves = [raw_leaf_hash(row[:11]) for row in rows]
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
    cores = os.cpu_count() or 1
    ceiling = verify_rate * cores * size / signatures
    print(
        f"  of which: read + recompute leaf hashes {leaf_rate:,.0f} entries/s; Merkle root "
        f"from scratch {root_rate:,.0f} leaves/s; Ed25519 {verify_rate:,.0f} verifications/s "
        f"per core. This log needs {signatures:,} verifications ({signatures / size:.2f} per "
        f"entry), which alone caps its audit at {ceiling:,.0f} entries/s on {cores} cores "
        f"(this audit: {size / audit_elapsed / ceiling:.0%} of that ceiling); with the "
        f"request signatures re-checked too (2 per receipt) the cap would be "
        f"{verify_rate * cores / 2:,.0f} entries/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--http-receipts", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    try:
        run(args, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # about 300 MB of logs


def run(args: argparse.Namespace, directory: Path) -> None:
    ledger = Identity.generate()
    key = directory / "ledger.key"
    save_identity(ledger, key)
    nodes = [Identity.generate() for _ in range(16)]
    clients = [Identity.generate() for _ in range(64)]
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
        f"batches of {BATCH} pairs; synchronous=FULL (WAL)"
    )

    with contextlib.ExitStack() as servers:
        single_url = servers.enter_context(server(directory / "http1.db", key, processes=1))
        multi_url = servers.enter_context(
            server(directory / "http.db", key, processes=os.cpu_count() or 1)
        )
        store = LedgerStore(directory / "log.db", ledger, rules=LedgerRules(beacon_period_s=PERIOD))
        for url in (single_url, multi_url):
            declare_over_http(url, nodes)
        declare_in_process(store, nodes)
        beacon = next_beacon(ledger)
        started = time.perf_counter()
        http_batches = workload(args.http_receipts, nodes, clients, beacon)
        print(
            f"signed {args.http_receipts} (request, receipt) pairs and their checks in "
            f"{time.perf_counter() - started:.1f} s (not timed below)"
        )
        half = len(http_batches) // 2
        single = credit_over_http(single_url, http_batches[:half], args.workers)
        print(
            f"HTTP, 1 server process, {args.workers} submitters: {single:,.0f} receipts "
            f"credited/s (target 2,000) -> {single / 2000:.2f}x target"
        )
        http_rate = credit_over_http(multi_url, http_batches[half:], args.workers)
        print(
            f"HTTP, {os.cpu_count()} server processes (--workers), {args.workers} submitters: "
            f"{http_rate:,.0f} receipts credited/s (target 2,000) -> {http_rate / 2000:.2f}x "
            f"target; {http_rate / single:.2f}x one process"
        )

    in_process = credit_in_process(store, http_batches)
    print(
        f"in process: {in_process:,.0f} receipts credited/s "
        f"(HTTP reaches {http_rate / in_process:.0%} of it)"
    )
    # Grow the same log past the requested size (credits, reputation, registrations).
    size = store._reader.size()
    while size < args.entries:
        more = workload(min(20_000, args.entries - size + BATCH), nodes, clients, beacon)
        credit_in_process(store, more)
        size = store._reader.size()
    store.close()
    print(f"log: {size:,} entries")

    cpu_before, started = cpu_seconds(), time.perf_counter()
    source = DbSource(directory / "log.db")
    report = audit(source)
    source.close()
    db_elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    # One per operation and per receipt; three per attestation (verdict, recomputation request
    # and receipt); beacons are checked once per report (not counted).
    signatures = report.operations + report.pairs_verified + 3 * report.attestations_verified
    print(
        f"audit --db: {report.tree_size:,} entries ({dict(report.kinds)}), "
        f"{report.pairs_verified:,} receipts and {report.attestations_verified:,} attestations "
        f"re-verified in {db_elapsed:.1f} s: {report.tree_size / db_elapsed:,.0f} entries/s "
        f"(target 20,000) -> {report.tree_size / db_elapsed / 20000:.2f}x target"
    )
    cores = os.cpu_count() or 1
    print(
        f"  CPU: {cpu:.1f} s over all processes, {cpu / report.tree_size * 1e6:.0f} us per "
        f"entry: {cores} cores kept busy would audit {report.tree_size / cpu * cores:,.0f} "
        f"entries/s (load average now {os.getloadavg()[0]:.1f}: the machine is shared)"
    )
    components(directory / "log.db", report.tree_size, signatures, db_elapsed)
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
