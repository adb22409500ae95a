"""Points only for checked work: a client's report credits a node's receipts only where a
passed verdict of the assigned, trusted verifier covers them, and pays the verifier for what it
checked. In process on a real SQLite file (the audit replays each log), plus the client over a
real uvicorn server. (Each refusal of an attestation: test_ledger_checks_v2.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from ledger_fixtures import (
    Clock,
    check,
    declare,
    declare_over_http,
    made_up_evidence,
    make_pairs,
    next_beacon,
    running_server,
    seed_identity,
    store_submitter,
    wait_for_next_beacon,
)
from typer.testing import CliRunner

from corolla.errors import LedgerRefused
from corolla.ledger.api.client import ClientConfig, LedgerClient
from corolla.ledger.api.models import b64encode
from corolla.ledger.api.reports import Attestation, report_body
from corolla.ledger.audit import audit
from corolla.ledger.cli import register
from corolla.ledger.config import LedgerRules
from corolla.ledger.sources import DbSource, HttpSource
from corolla.ledger.store import LedgerStore
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
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    ledger = LedgerStore(tmp_path / "ledger.db", LEDGER, clock=clock)
    yield ledger
    ledger.close()
    audited(tmp_path / "ledger.db")


def audited(path: Path) -> None:
    source = DbSource(path)
    try:
        audit(source)
    finally:
        source.close()


def report(
    store: LedgerStore, pairs: Pairs, attestations: list[Attestation], client: Identity = CLIENT
) -> dict[str, Any]:
    return store_submitter(store)(client, "report", report_body(pairs, attestations))


def credited(result: dict[str, Any]) -> list[int]:
    return [pair["credited_units"] for pair in result["pairs"]]


def balance(store: LedgerStore, key: bytes) -> int:
    account = store._reader.account(key)
    return 0 if account is None else account.balance


def test_checked_work_is_credited_and_unchecked_work_is_not(
    store: LedgerStore, clock: Clock
) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    checked, unchecked = make_pairs(CLIENT, NODE, steps=3), make_pairs(CLIENT, OTHER, steps=3)
    result = report(store, checked + unchecked, [check(CLIENT, VERIFIER, checked, beacon)])
    assert credited(result) == [20, 4, 4, 0, 0, 0]
    assert {p.get("reason") for p in result["pairs"][3:]} == {
        "no passed check by its assigned verifier covers it"
    }
    assert balance(store, NODE.public_key) == 28
    assert balance(store, OTHER.public_key) == 0


def test_a_check_credits_only_the_steps_it_compared(store: LedgerStore, clock: Clock) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=4)
    result = report(store, pairs, [check(CLIENT, VERIFIER, pairs, beacon, end_step=2)])
    assert credited(result) == [20, 4, 0, 0]
    assert result["attestations"][0]["fee"] == 24 * 100 // 1000
    # The next check of the session (from step 2 on) credits the rest.
    result = report(store, pairs, [check(CLIENT, VERIFIER, pairs, beacon, first_step=2)])
    assert credited(result) == [0, 0, 4, 4]


def test_a_slashed_verifier_does_not_count(store: LedgerStore, clock: Clock) -> None:
    submit = store_submitter(store)
    for verifier in (VERIFIER, WITNESS):
        declare(submit, verifier)
    # VERIFIER is caught cheating as a node by two others that agree: slashed.
    evidence = made_up_evidence(OTHER, VERIFIER, [NODE, WITNESS])
    verdict = submit(OTHER, "evidence", {"evidence": b64encode(evidence.to_bytes())})
    assert verdict["verdict"] == "guilty"
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    with pytest.raises(LedgerRefused, match="was slashed: it is not trusted") as refused:
        report(store, pairs, [check(CLIENT, VERIFIER, pairs, beacon)])
    assert refused.value.status_code == 409
    # The same work checked by a verifier in good standing is credited.
    assert credited(report(store, pairs, [check(CLIENT, WITNESS, pairs, beacon)])) == [20, 4]


def test_a_verifier_needs_the_reputation_the_rules_ask_for(tmp_path: Path) -> None:
    clock = Clock()
    rules = LedgerRules(min_verifier_reputation=1)
    store = LedgerStore(
        tmp_path / "ledger.db",
        LEDGER,
        rules=rules,
        clock=clock,
        seed_verifiers=[WITNESS.public_key],
    )
    try:
        submit = store_submitter(store)
        for verifier in (VERIFIER, WITNESS):
            declare(submit, verifier)
        beacon = next_beacon(store, clock)
        pairs = make_pairs(CLIENT, NODE, steps=2)
        with pytest.raises(LedgerRefused, match="reputation 0, below 1"):
            report(store, pairs, [check(CLIENT, VERIFIER, pairs, beacon)])
        # The seed verifier counts from the start; VERIFIER earns reputation by serving work
        # that the seed checked, and then counts too.
        assert credited(report(store, pairs, [check(CLIENT, WITNESS, pairs, beacon)])) == [20, 4]
        served = make_pairs(CLIENT, VERIFIER, steps=1)
        assert credited(report(store, served, [check(CLIENT, WITNESS, served, beacon)])) == [20]
        again = make_pairs(CLIENT, OTHER, steps=1)
        assert credited(report(store, again, [check(CLIENT, VERIFIER, again, beacon)])) == [20]
    finally:
        store.close()
    audited(tmp_path / "ledger.db")


def test_the_client_reports_in_batches_that_keep_checks_with_their_steps(tmp_path: Path) -> None:
    db, key = tmp_path / "ledger.db", tmp_path / "ledger.key"
    save_identity(LEDGER, key)
    sessions = [make_pairs(CLIENT, node, steps=3) for node in (NODE, OTHER, WITNESS)]
    config = ClientConfig(batch_pairs=4)
    with running_server(db, key) as server:
        declare_over_http(server.url, VERIFIER)
        with LedgerClient(server.url, CLIENT, config) as ledger:
            beacon = wait_for_next_beacon(ledger)
            checks = [check(CLIENT, VERIFIER, pairs, beacon) for pairs in reversed(sessions)]
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
    ):
        beacon = impostor.beacon()
        with pytest.raises(LedgerRefused, match="not the reporter") as refused:
            impostor.submit_report(pairs, [check(CLIENT, VERIFIER, pairs, beacon)])
    assert refused.value.status_code == 400
