"""Points only for checked work: a client's report credits a node's receipts only where a
passed spot-check by an independent, trusted verifier covers them, and pays the verifier a fee
once. In process on a real SQLite file (the audit replays each log), plus the client over a
real uvicorn server."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from ledger_fixtures import attest, made_up_evidence, make_pairs, running_server, seed_identity
from typer.testing import CliRunner

from corolla.errors import BadSignature, LedgerRefused
from corolla.ledger.api.client import ClientConfig, LedgerClient
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.models import b64encode
from corolla.ledger.api.reports import Attestation, report_body
from corolla.ledger.audit import audit
from corolla.ledger.cli import register
from corolla.ledger.config import LedgerRules
from corolla.ledger.sources import DbSource, HttpSource
from corolla.ledger.store import LedgerStore
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity, save_identity
from corolla.verify.receipts import Receipt, StepRequest

LEDGER = seed_identity("ledger")
CLIENT = seed_identity("client")
NODE = seed_identity("node")
OTHER = seed_identity("other-node")
VERIFIER = seed_identity("verifier")
WITNESS = seed_identity("witness")

Pairs = list[tuple[StepRequest, Receipt]]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    ledger = LedgerStore(tmp_path / "ledger.db", LEDGER)
    yield ledger
    ledger.close()
    audited(tmp_path / "ledger.db")


def audited(path: Path) -> None:
    source = DbSource(path)
    try:
        audit(source)
    finally:
        source.close()


def submit(store: LedgerStore, author: Identity, action: str, body: Any) -> dict[str, Any]:
    return store.submit(sign_envelope(author, action, canonical(body)), body)


def report(
    store: LedgerStore, pairs: Pairs, attestations: list[Attestation], client: Identity = CLIENT
) -> dict[str, Any]:
    return submit(store, client, "report", report_body(pairs, attestations))


def credited(result: dict[str, Any]) -> list[int]:
    return [pair["credited_units"] for pair in result["pairs"]]


def balance(store: LedgerStore, key: bytes) -> int:
    account = store._reader.account(key)
    return 0 if account is None else account.balance


def test_checked_work_is_credited_and_unchecked_work_is_not(store: LedgerStore) -> None:
    checked, unchecked = make_pairs(CLIENT, NODE, steps=3), make_pairs(CLIENT, OTHER, steps=3)
    result = report(store, checked + unchecked, [attest(CLIENT, VERIFIER, checked)])
    assert credited(result) == [20, 4, 4, 0, 0, 0]
    assert {p.get("reason") for p in result["pairs"][3:]} == {
        "no passed spot-check by a trusted, independent verifier covers it"
    }
    assert balance(store, NODE.public_key) == 28
    assert balance(store, OTHER.public_key) == 0


def test_a_check_credits_only_the_steps_it_compared(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=4)
    result = report(store, pairs, [attest(CLIENT, VERIFIER, pairs, steps=2)])
    assert credited(result) == [20, 4, 0, 0]
    assert result["attestations"][0]["fee"] == 24 * 100 // 1000


def test_a_failed_check_credits_nothing_of_that_node_session(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=4)
    early = attest(CLIENT, VERIFIER, pairs, steps=2)
    caught = attest(CLIENT, WITNESS, pairs, passed=False)
    result = report(store, pairs, [early, caught])
    assert credited(result) == [0, 0, 0, 0]
    assert result["pairs"][0]["reason"] == "a spot-check of this node-session failed"
    # Both verifiers did their work: each is paid for its recomputation.
    assert [check["fee"] for check in result["attestations"]] == [2, 3]
    assert balance(store, NODE.public_key) == 0


@pytest.mark.parametrize("who", ["node", "client"])
def test_a_verifier_that_is_the_node_or_the_client_does_not_count(
    store: LedgerStore, who: str
) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=2)
    verifier = NODE if who == "node" else CLIENT
    result = report(store, pairs, [attest(CLIENT, verifier, pairs)])
    assert credited(result) == [0, 0]
    check = result["attestations"][0]
    assert not check["counted"] and check["fee"] == 0
    expected = {"node": "the checked node itself", "client": "the client itself"}[who]
    assert check["reason"] == f"the verifier is {expected}"
    assert result["entries"] == []


def test_a_slashed_verifier_does_not_count(store: LedgerStore) -> None:
    # VERIFIER is caught cheating as a node by two others that agree: slashed.
    evidence = made_up_evidence(OTHER, VERIFIER, [NODE, WITNESS])
    verdict = submit(store, OTHER, "evidence", {"evidence": b64encode(evidence.to_bytes())})
    assert verdict["verdict"] == "guilty"
    pairs = make_pairs(CLIENT, NODE, steps=2)
    result = report(store, pairs, [attest(CLIENT, VERIFIER, pairs)])
    assert credited(result) == [0, 0]
    assert "was slashed" in result["attestations"][0]["reason"]
    assert balance(store, VERIFIER.public_key) == 0
    # The same work checked by a verifier in good standing is credited.
    assert credited(report(store, pairs, [attest(CLIENT, WITNESS, pairs)])) == [20, 4]


def test_a_verifier_needs_the_reputation_the_rules_ask_for(tmp_path: Path) -> None:
    rules = LedgerRules(min_verifier_reputation=1)
    store = LedgerStore(
        tmp_path / "ledger.db", LEDGER, rules=rules, seed_verifiers=[WITNESS.public_key]
    )
    try:
        pairs = make_pairs(CLIENT, NODE, steps=2)
        result = report(store, pairs, [attest(CLIENT, VERIFIER, pairs)])
        assert credited(result) == [0, 0]
        assert "reputation 0, below the 1" in result["attestations"][0]["reason"]
        # The seed verifier counts from the start; VERIFIER earns reputation by serving work
        # that the seed checked, and then counts too.
        assert credited(report(store, pairs, [attest(CLIENT, WITNESS, pairs)])) == [20, 4]
        served = make_pairs(CLIENT, VERIFIER, steps=1)
        assert credited(report(store, served, [attest(CLIENT, WITNESS, served)])) == [20]
        again = make_pairs(CLIENT, OTHER, steps=1)
        assert credited(report(store, again, [attest(CLIENT, VERIFIER, again)])) == [20]
    finally:
        store.close()
    audited(tmp_path / "ledger.db")


def test_a_verifier_is_paid_once_per_recomputation(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=3)
    check = attest(CLIENT, VERIFIER, pairs)
    first = report(store, pairs, [check])
    again = report(store, pairs, [check])
    assert first["attestations"][0]["fee"] == 2 and again["attestations"][0]["fee"] == 0
    assert again["entries"] == []
    assert balance(store, VERIFIER.public_key) == 2
    # Another recomputation (a second check of the same work) is other work: paid.
    report(store, pairs, [attest(CLIENT, VERIFIER, pairs)])
    assert balance(store, VERIFIER.public_key) == 4
    assert balance(store, NODE.public_key) == 28


def test_a_recomputation_of_other_tokens_or_without_the_steps_does_not_count(
    store: LedgerStore,
) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=3)
    short = attest(CLIENT, VERIFIER, pairs, tokens=6)
    result = report(store, pairs, [short])
    assert "covers 6 tokens, the node's steps 0..2 cover 7" in result["attestations"][0]["reason"]
    missing = report(store, pairs[1:], [attest(CLIENT, VERIFIER, pairs)])
    assert "lacks the node's step 0" in missing["attestations"][0]["reason"]
    assert balance(store, NODE.public_key) == 0


def test_a_forged_recomputation_refuses_the_whole_report(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=2)
    check = attest(CLIENT, VERIFIER, pairs)
    forged = dataclasses.replace(
        check, receipt=dataclasses.replace(check.receipt, output_digest=bytes(32))
    )
    with pytest.raises(BadSignature, match="attestation 0"):
        report(store, pairs, [forged])
    assert store._reader.size() == 1


def test_the_client_reports_in_batches_that_keep_checks_with_their_steps(tmp_path: Path) -> None:
    db, key = tmp_path / "ledger.db", tmp_path / "ledger.key"
    save_identity(LEDGER, key)
    sessions = [make_pairs(CLIENT, node, steps=3) for node in (NODE, OTHER, WITNESS)]
    checks = [attest(CLIENT, VERIFIER, pairs) for pairs in reversed(sessions)]
    config = ClientConfig(batch_pairs=4)
    with running_server(db, key) as server:
        with LedgerClient(server.url, CLIENT, config) as ledger:
            results = ledger.submit_report([p for pairs in sessions for p in pairs], checks)
            assert len(results) == 3
            assert all(credited(result) == [20, 4, 4] for result in results)
            assert ledger.balance(VERIFIER.public_key) == 3 * 2
        app = typer.Typer()
        register(app)
        shown = CliRunner().invoke(
            app, ["ledger", "history", VERIFIER.public_key.hex(), "--url", server.url, "--json"]
        )
        assert shown.exit_code == 0, shown.output
        fees = json.loads(shown.output)
        assert [entry["kind"] for entry in fees][:3] == ["verifier_fee"] * 3
        assert "28 block-tokens recomputed" in fees[0]["detail"]
        source = HttpSource(server.url)
        try:
            result = audit(source)
        finally:
            source.close()
    assert result.attestations_verified == 3 and result.kinds["verifier_fee"] == 3


def test_a_report_by_someone_else_than_the_client_is_refused_over_http(tmp_path: Path) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=2)
    with (
        running_server(tmp_path / "ledger.db", tmp_path / "ledger.key") as server,
        LedgerClient(server.url, Identity.generate()) as impostor,
        pytest.raises(LedgerRefused, match="not the reporter") as refused,
    ):
        impostor.submit_report(pairs, [attest(CLIENT, VERIFIER, pairs)])
    assert refused.value.status_code == 400
