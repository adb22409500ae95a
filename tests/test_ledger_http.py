"""The ledger over HTTP: a real uvicorn server on 127.0.0.1 and a real SQLite file."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from ledger_fixtures import (
    LedgerServer,
    check,
    declare_over_http,
    earn,
    free_port,
    made_up_evidence,
    make_pairs,
    running_server,
    wait_for_next_beacon,
)
from typer.testing import CliRunner

from corolla.errors import LedgerError, LedgerRefused
from corolla.ledger.api.client import ClientConfig, LedgerClient
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.reports import Attestation, report_body
from corolla.ledger.audit import audit
from corolla.ledger.cli import register
from corolla.ledger.sources import HttpSource
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity, load_identity, save_identity
from corolla.verify.merkle import verify_consistency, verify_inclusion
from corolla.verify.receipts import Receipt, StepRequest


def checked(
    ledger: LedgerClient, client: Identity, node: Identity, **options: int
) -> list[dict[str, object]]:
    """``client`` reports a session of ``node``'s, checked by its assigned verifier."""
    return earn(ledger.client.url, client, node, **options)


def checked_session(
    url: str, client: Identity, node: Identity, steps: int
) -> tuple[list[tuple[StepRequest, Receipt]], list[Attestation], Identity]:
    """A session of ``node``'s and the check of it by its assigned verifier (a fresh one, the
    only candidate for a fresh model), not yet reported."""
    model, verifier = secrets.token_bytes(32), Identity.generate()
    declare_over_http(url, verifier, model=model)
    pairs = make_pairs(client, node, steps=steps, model=model)
    with LedgerClient(url) as reader:
        beacon = wait_for_next_beacon(reader)
    return pairs, [check(client, verifier, pairs, beacon)], verifier


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerServer]:
    directory = tmp_path_factory.mktemp("ledger")
    with running_server(directory / "ledger.db", directory / "ledger.key") as running:
        yield running


def test_earn_spend_redeem_slash_cycle_and_balances_match_the_log(server: LedgerServer) -> None:
    client_id, node_a, node_b = Identity.generate(), Identity.generate(), Identity.generate()
    operator = load_identity(server.key)
    with (
        LedgerClient(server.url, node_a) as as_a,
        LedgerClient(server.url, client_id) as as_client,
        LedgerClient(server.url, operator) as as_operator,
    ):
        # Earn: node A serves the client (and the client serves as a node for node B), checked.
        as_a.register("node-a")
        checked(as_a, client_id, node_a, steps=5, prefill=8)
        checked(as_a, node_b, client_id, steps=4, prefill=6)
        assert as_a.balance(node_a.public_key) == 4 * 12
        assert as_a.balance(client_id.public_key) == 4 * 9
        # Spend: the client buys a ticket; node B redeems ticketed receipts.
        ticket = as_client.buy_ticket(budget=20, ttl_s=600)
        assert as_client.balance(client_id.public_key) == 36 - 20
        ticketed = make_pairs(client_id, node_b, steps=3, prefill=4, ticket=ticket.digest())
        paid = as_client.redeem(ticketed)
        assert [p["redeemed_units"] for p in paid[0]["pairs"]] == [16, 4, 0]
        assert as_client.ticket(ticket.digest())[1] == 20
        assert as_client.balance(node_b.public_key) == 20
        # Slash: one verifier's word is logged unjudged; the operator slashes on it.
        evidence = made_up_evidence(client_id, node_a, [Identity.generate()])
        verdict = as_client.submit_evidence(evidence)
        assert (verdict.verdict, verdict.taken) == ("unjudged", 0)
        assert as_operator.slash(node_a.public_key, "read it", verdict.evidence_digest) == 48
        account = as_a.account(node_a.public_key)
        assert account is not None and (account.balance, account.reputation) == (0, 0)
        assert account.slashed
        # Balances match the log: each account's history sums to its balance...
        for key in (node_a.public_key, node_b.public_key, client_id.public_key):
            history = as_a.history(key, limit=1000)
            assert sum(e.amount for e in history if e.kind != "reputation_changed") == (
                as_a.balance(key)
            )
        assert [e.kind for e in as_a.history(node_a.public_key, limit=2)] == [
            "reputation_changed",
            "slash",
        ]
    # ...and the auditor recomputes every balance from the log alone.
    source = HttpSource(server.url)
    try:
        report = audit(source)
    finally:
        source.close()
    assert report.cached_state_compared
    assert report.kinds["slash"] >= 1 and report.kinds["ticket_redeemed"] >= 2


def test_a_double_report_over_http_credits_once(server: LedgerServer) -> None:
    client_id, node = Identity.generate(), Identity.generate()
    pairs, checks, verifier = checked_session(server.url, client_id, node, steps=3)
    with LedgerClient(server.url, client_id) as ledger:
        first = ledger.submit_report(pairs, checks)[0]
        second = ledger.submit_report(pairs, checks)[0]
        assert sum(p["credited_units"] for p in first["pairs"]) == 28
        assert sum(p["credited_units"] for p in second["pairs"]) == 0
        assert ledger.balance(node.public_key) == 28
        assert ledger.balance(verifier.public_key) == 2


def test_the_removed_work_endpoint_is_not_routed_at_all(server: LedgerServer) -> None:
    response = httpx.post(server.url + "/v1/work", json={"pairs": []})
    assert response.status_code in (404, 405) and response.json()["error"]
    assert "/v1/work" not in httpx.get(server.url + "/openapi.json").json()["paths"]


def signed_post(
    server: LedgerServer, author: Identity, path: str, action: str, body: object, **envelope: int
) -> httpx.Response:
    data = canonical(body)
    headers = sign_envelope(author, action, data, **envelope).to_headers()  # type: ignore[arg-type]
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_forged_replayed_expired_and_unsigned_requests_are_refused(server: LedgerServer) -> None:
    client_id = Identity.generate()
    pairs, checks, _ = checked_session(server.url, client_id, Identity.generate(), steps=2)
    body = report_body(pairs, checks)
    data = canonical(body)
    envelope = sign_envelope(client_id, "report", data)
    headers = envelope.to_headers()
    forged = {
        **headers,
        "X-Corolla-Signature": sign_envelope(client_id, "register", data).signature.hex(),
    }
    response = httpx.post(server.url + "/v1/reports", json=body, headers=forged)
    assert response.status_code == 401 and "does not verify" in response.json()["error"]
    assert httpx.post(server.url + "/v1/reports", json=body, headers=headers).status_code == 200
    replay = httpx.post(server.url + "/v1/reports", json=body, headers=headers)
    assert replay.status_code == 409 and "replayed" in replay.json()["error"]
    expired = signed_post(
        server, client_id, "/v1/reports", "report", body, timestamp=envelope.timestamp - 600_000
    )
    assert expired.status_code == 401 and "clock" in expired.json()["error"]
    unsigned = httpx.post(server.url + "/v1/reports", json=body)
    assert unsigned.status_code == 401 and "missing" in unsigned.json()["error"]
    # A body signed for one action cannot be replayed to another endpoint.
    moved = httpx.post(server.url + "/v1/tickets/redeem", json=body, headers=headers)
    assert moved.status_code == 401


def test_oversized_bodies_big_pages_and_malformed_input_get_clear_4xx(server: LedgerServer) -> None:
    node = Identity.generate()
    big = httpx.post(server.url + "/v1/reports", content=b" " * (5 * 1024 * 1024))
    assert big.status_code == 413 and "larger than" in big.json()["error"]
    # Fraud evidence carries tensors: its endpoint takes more, up to its own limit.
    evidence = httpx.post(server.url + "/v1/evidence", content=b" " * (5 * 1024 * 1024))
    assert evidence.status_code != 413 and evidence.json()["error"]
    huge = httpx.post(server.url + "/v1/evidence", content=b" " * (33 * 1024 * 1024))
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]
    page = httpx.get(server.url + "/v1/entries", params={"limit": 100_000})
    assert page.status_code == 422 and "limit" in page.json()["error"]
    garbage = httpx.post(
        server.url + "/v1/reports",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert garbage.status_code in (400, 422) and garbage.json()["error"]
    headers = sign_envelope(node, "buy-ticket", canonical({"budget": 1, "ttl_s": 60})).to_headers()
    floats = httpx.post(
        server.url + "/v1/tickets", json={"budget": 1.5, "ttl_s": 60}, headers=headers
    )
    assert floats.status_code == 422 and "budget" in floats.json()["error"]
    poor = signed_post(server, node, "/v1/tickets", "buy-ticket", {"budget": 5, "ttl_s": 60})
    assert poor.status_code == 409 and "insufficient balance" in poor.json()["error"]
    unknown = httpx.get(server.url + "/v1/accounts/" + "ab" * 32)
    assert unknown.status_code == 404 and unknown.json()["error"]


def test_proofs_from_the_server_verify_against_its_signed_checkpoint(server: LedgerServer) -> None:
    node = Identity.generate()
    with LedgerClient(server.url, node) as ledger:
        checked(ledger, Identity.generate(), node, steps=2)
        old = ledger.checkpoint()
        checked(ledger, Identity.generate(), node, steps=2)
        new = ledger.checkpoint(ledger_key=old.ledger_key)
        assert new.tree_size > old.tree_size
        proof = ledger.consistency_proof(old.tree_size, new.tree_size)
        verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)
        for index in (0, old.tree_size - 1, new.tree_size - 1):
            leaf, path = ledger.inclusion_proof(index, new.tree_size)
            verify_inclusion(leaf, index, new.tree_size, path, new.root_hash)
        page = ledger.entries(new.tree_size - 1, 1)
        assert page.entries[0].leaf_hash() == page.leaf_hashes[new.tree_size - 1]


def test_the_openapi_document_is_served_at_docs(server: LedgerServer) -> None:
    assert httpx.get(server.url + "/docs").status_code == 200
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in (
        "/v1/reports",
        "/v1/tickets",
        "/v1/tickets/redeem",
        "/v1/evidence",
        "/v1/slash",
        "/v1/entries",
        "/v1/checkpoint",
        "/v1/proofs/inclusion",
        "/v1/proofs/consistency",
        "/v1/accounts/{key}",
        "/v1/top",
        "/v1/beacon",
        "/v1/beacon/{epoch}",
        "/v1/serving",
        "/v1/serving/withdraw",
        "/v1/calibrations",
        "/v1/calibrations/{model}",
        "/v1/disputes",
    ):
        assert path in paths


def test_the_client_gives_up_after_bounded_retries_on_a_dead_ledger() -> None:
    config = ClientConfig(timeout_s=1.0, attempts=2, backoff_s=0.01)
    with LedgerClient(f"http://127.0.0.1:{free_port()}", Identity.generate(), config) as ledger:
        with pytest.raises(LedgerError, match="unreachable"):
            ledger.info()
        with pytest.raises(LedgerError, match="unreachable"):
            ledger.register("nobody")


def test_the_client_raises_ledger_refused_with_the_servers_reason(server: LedgerServer) -> None:
    with LedgerClient(server.url, Identity.generate()) as ledger:
        with pytest.raises(LedgerRefused, match="insufficient balance") as refused:
            ledger.buy_ticket(10, 60)
        assert refused.value.status_code == 409


def test_balance_history_and_top_commands_print_json(server: LedgerServer, tmp_path: Path) -> None:
    node = Identity.generate()
    with LedgerClient(server.url, node) as ledger:
        checked(ledger, Identity.generate(), node, steps=2, prefill=50)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    key = node.public_key.hex()
    result = runner.invoke(app, ["ledger", "balance", key, "--url", server.url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["balance"] == 4 * 51
    result = runner.invoke(app, ["ledger", "history", key, "--url", server.url, "--json"])
    history = json.loads(result.output)
    assert [e["kind"] for e in history] == [
        "work_credited",
        "reputation_changed",
        "work_credited",
        "account_registered",
    ]
    assert "checked by attestation 0" in history[0]["detail"]
    result = runner.invoke(app, ["ledger", "top", "--url", server.url, "--json", "--limit", "3"])
    assert json.loads(result.output)[0]["account"] == key
    result = runner.invoke(app, ["ledger", "top", "--url", server.url])
    assert result.exit_code == 0 and "top 10 by balance" in result.output


def test_the_ledger_command_group_offers_serve_audit_and_the_readers() -> None:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["ledger", "--help"])
    assert result.exit_code == 0
    for command in ("serve", "audit", "balance", "history", "top", "slash", "publish-tolerance"):
        assert command in result.output
    both = CliRunner().invoke(app, ["ledger", "audit"])
    assert both.exit_code != 0


def test_the_serve_command_serves_the_ledger_its_options_describe(tmp_path: Path) -> None:
    seed = Identity.generate()
    save_identity(seed, tmp_path / "seed.key")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = {
        "--db": tmp_path / "ledger.db",
        "--key": tmp_path / "ledger.key",
        "--host": "127.0.0.1",
        "--port": port,
        "--origin": "form-test",
        "--credit-per-block-token": 3,
        "--ticket-price": 2,
        "--workers": 1,
        "--verifier-fee-permille": 50,
        "--min-verifier-reputation": 1,
        "--beacon-period-s": 7,
        "--referee-max-tokens": 64,
        "--max-evidence-bytes": 4096,
        "--seed-verifier": tmp_path / "seed.key",  # a key file; a hex key works too
    }
    command = [sys.executable, "-m", "corolla", "ledger", "serve"]
    command += [str(part) for pair in options.items() for part in pair]
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            info, seeded = None, None
            deadline = time.monotonic() + 180  # the whole command loads; the machine is shared
            while info is None and process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    info = httpx.get(url + "/v1/info", timeout=2).json()
                    seeded = httpx.get(f"{url}/v1/accounts/{seed.public_key.hex()}").json()
                time.sleep(0.2)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    assert info is not None and seeded is not None, log.read_text()[-2000:]
    assert info["origin"] == "form-test"
    assert info["ledger_key"] == load_identity(tmp_path / "ledger.key").public_key.hex()
    rules = info["rules"]
    assert (rules["credit_per_block_token"], rules["ticket_price_per_block_token"]) == (3, 2)
    assert (rules["verifier_fee_permille"], rules["min_verifier_reputation"]) == (50, 1)
    assert rules["beacon_period_s"] == 7
    assert info["limits"]["max_evidence_body_bytes"] == 4096
    assert info["referee"] is False
    assert seeded["reputation"] == 1 and seeded["name"] == "seed verifier"
    assert f"ledger form-test on {url} (docs at /docs)" in log.read_text()
    assert "no referee" in log.read_text()


def test_the_serve_command_offers_every_option() -> None:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["ledger", "serve", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for option in (
        "--db",
        "--key",
        "--host",
        "--port",
        "--origin",
        "--credit-per-block-token",
        "--ticket-price",
        "--workers",
        "--verifier-fee-permille",
        "--min-verifier-reputation",
        "--beacon-period-s",
        "--referee-model",
        "--referee-max-tokens",
        "--max-evidence-bytes",
        "--seed-verifier",
    ):
        assert option in result.output


def test_two_server_processes_share_one_log_without_double_credit(tmp_path: Path) -> None:
    client_id, node = Identity.generate(), Identity.generate()
    results: list[int] = []

    def submit() -> None:
        with LedgerClient(server.url, client_id) as ledger:
            answer = ledger.submit_report(pairs, checks)[0]
            results.append(sum(p["credited_units"] for p in answer["pairs"]))

    with running_server(
        tmp_path / "ledger.db", tmp_path / "ledger.key", extra=("--workers", "2")
    ) as server:
        pairs, checks, _ = checked_session(server.url, client_id, node, steps=4)
        threads = [threading.Thread(target=submit) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(results) == [0, 0, 0, 0, 0, 4 * 8]
        source = HttpSource(server.url)
        try:
            assert audit(source).cached_state_compared
        finally:
            source.close()
