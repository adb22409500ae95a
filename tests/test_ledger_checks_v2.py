"""Checks v2 at the ledger: a check counts only as a verifier's signed verdict, by the verifier
the ledger's beacon assigned among those that declared the span before the epoch began, held
to the ledger's threshold, over the recomputation it names and the outputs the node signed.
Every other attestation refuses its report, naming why. In process on a real SQLite file (each
log audited after the test), and the beacon, serving and calibration routes over a real server.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from ledger_fixtures import (
    MODEL,
    PROFILE,
    Clock,
    check,
    declare,
    declare_over_http,
    earn,
    make_pairs,
    next_beacon,
    running_server,
    seed_identity,
    store_submitter,
    wait_for_next_beacon,
)
from typer.testing import CliRunner

from corolla.errors import BadReceipt, BadSignature, InvalidInput, LedgerRefused
from corolla.ledger.api.checks import Serving, calibration_to_wire
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.reports import report_body
from corolla.ledger.audit import audit
from corolla.ledger.cli import register
from corolla.ledger.config import LedgerRules
from corolla.ledger.sources import DbSource, HttpSource
from corolla.ledger.store import DEFAULT_ORIGIN, LedgerStore
from corolla.verify.assignment import assignment_seed, within_reach
from corolla.verify.beacon import sign_beacon
from corolla.verify.identity import Identity, save_identity
from corolla.verify.receipts import make_receipt
from corolla.verify.tolerance import Calibration, save_calibrations

LEDGER = seed_identity("ledger")
CLIENT = seed_identity("client")
NODE = seed_identity("node")
VERIFIER = seed_identity("verifier")
OTHERS = [seed_identity(f"verifier-{n}") for n in range(6)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    ledger = LedgerStore(
        tmp_path / "ledger.db", LEDGER, clock=clock, rules=LedgerRules(beacon_period_s=1)
    )
    yield ledger
    ledger.close()
    source = DbSource(tmp_path / "ledger.db")
    try:
        audit(source)
    finally:
        source.close()


def report(store: LedgerStore, pairs: list[Any], attestations: list[Any]) -> dict[str, Any]:
    return store_submitter(store)(CLIENT, "report", report_body(pairs, attestations))


def balance(store: LedgerStore, key: bytes) -> int:
    account = store._reader.account(key)
    return 0 if account is None else account.balance


def test_the_assigned_verifiers_passed_verdict_credits_the_node_and_pays_the_verifier(
    store: LedgerStore, clock: Clock
) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=3)  # 5 + 1 + 1 tokens on 4 blocks
    result = report(store, pairs, [check(CLIENT, VERIFIER, pairs, beacon)])
    assert [pair["credited_units"] for pair in result["pairs"]] == [20, 4, 4]
    assert result["attestations"] == [{"attestation": 0, "counted": True, "fee": 2, "units": 28}]
    assert (balance(store, NODE.public_key), balance(store, VERIFIER.public_key)) == (28, 2)


def test_a_later_check_by_the_same_verifier_pays_only_the_positions_it_adds(
    store: LedgerStore, clock: Clock
) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=12, prefill=20, end=5)  # 20 + 11 tokens, 5 blocks
    first = check(CLIENT, VERIFIER, pairs, beacon, end_step=6)  # positions [0, 25)
    result = report(store, pairs[:6], [first])
    assert result["attestations"][0]["fee"] == 25 * 5 * 100 // 1000
    later = check(CLIENT, VERIFIER, pairs, beacon, first_step=6)  # positions [25, 31)
    result = report(store, pairs, [later])
    assert result["attestations"][0] == {"attestation": 0, "counted": True, "fee": 3, "units": 30}
    # A re-check from step 0 is paid only for positions never paid; the same verdict again,
    # nothing (and the work it covers was credited already).
    again = check(CLIENT, VERIFIER, pairs, beacon)
    result = report(store, pairs, [again, again])
    assert [a["fee"] for a in result["attestations"]] == [0, 0]
    assert {pair["credited_units"] for pair in result["pairs"]} == {0}
    assert balance(store, VERIFIER.public_key) == 12 + 3
    assert balance(store, NODE.public_key) == 31 * 5


def test_a_failed_verdict_blocks_the_node_session_and_still_pays_its_verifier(
    store: LedgerStore, clock: Clock
) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=4)
    early = check(CLIENT, VERIFIER, pairs, beacon, end_step=2)
    caught = check(CLIENT, VERIFIER, pairs, beacon, first_step=2, passed=False)
    result = report(store, pairs, [early, caught])
    assert {pair["credited_units"] for pair in result["pairs"]} == {0}
    assert result["pairs"][0]["reason"] == "a check of this node-session failed"
    assert [a["fee"] for a in result["attestations"]] == [2, 0]  # 24 and 8 units at 10 %
    assert balance(store, NODE.public_key) == 0


def test_the_node_and_the_client_are_passed_over_in_the_draw(
    store: LedgerStore, clock: Clock
) -> None:
    submit = store_submitter(store)
    for key in (NODE, CLIENT, VERIFIER):
        declare(submit, key)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    result = report(store, pairs, [check(CLIENT, VERIFIER, pairs, beacon)])
    assert [pair["credited_units"] for pair in result["pairs"]] == [20, 4]


def refused(store: LedgerStore, pairs: list[Any], attestation: Any) -> LedgerRefused:
    size = store._reader.size()
    with pytest.raises(LedgerRefused) as caught:
        report(store, pairs, [attestation])
    assert store._reader.size() == size  # nothing appended
    assert str(caught.value).startswith("attestation 0: ")
    return caught.value


def test_a_verifier_outside_the_assignments_reach_does_not_count(
    store: LedgerStore, clock: Clock
) -> None:
    submit = store_submitter(store)
    for verifier in OTHERS:
        declare(submit, verifier)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    last = pairs[-1][1]
    seed = assignment_seed(beacon, NODE.public_key, last.session_id, 0, 4, 2, last.chain_digest)
    candidates = [v.public_key for v in OTHERS]
    reach = within_reach(seed, candidates, (NODE.public_key, CLIENT.public_key), lambda _: True)
    outside = next(v for v in OTHERS if v.public_key not in reach)
    error = refused(store, pairs, check(CLIENT, outside, pairs, beacon))
    assert error.status_code == 409 and "not within reach of the assignment" in str(error)
    assigned = next(v for v in OTHERS if v.public_key == reach[-1])  # the one skip allowed
    result = report(store, pairs, [check(CLIENT, assigned, pairs, beacon)])
    assert [pair["credited_units"] for pair in result["pairs"]] == [20, 4]


def test_a_verifier_the_client_chose_itself_does_not_count(
    store: LedgerStore, clock: Clock
) -> None:
    submit = store_submitter(store)
    declare(submit, VERIFIER, model=secrets.token_bytes(32))  # another model
    beacon = next_beacon(store, clock)
    late = OTHERS[0]
    declare(submit, late)  # declared after the epoch began: not a candidate for its beacon
    pairs = make_pairs(CLIENT, NODE, steps=2)
    for chosen in (VERIFIER, late, seed_identity("never-declared")):
        error = refused(store, pairs, check(CLIENT, chosen, pairs, beacon))
        assert error.status_code == 409 and "had not declared serving" in str(error)


def test_a_verifier_that_withdrew_before_the_epoch_does_not_count(
    store: LedgerStore, clock: Clock
) -> None:
    submit = store_submitter(store)
    declare(submit, VERIFIER)
    submit(VERIFIER, "serving-withdraw", Serving(MODEL, 0, 64, PROFILE).to_body())
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    assert "had not declared" in str(refused(store, pairs, check(CLIENT, VERIFIER, pairs, beacon)))


def test_a_verdict_that_does_not_follow_from_its_score_does_not_count(
    store: LedgerStore, clock: Clock
) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    lying = check(CLIENT, VERIFIER, pairs, beacon, passed=True, score="0.31")
    error = refused(store, pairs, lying)
    assert "says passed, but its score 0.31" in str(error)
    hidden = check(CLIENT, VERIFIER, pairs, beacon, passed=False, score="2e-06")
    assert "says failed" in str(refused(store, pairs, hidden))
    unbounded = check(CLIENT, VERIFIER, pairs, beacon, passed=True, score="nan")
    assert "says passed" in str(refused(store, pairs, unbounded))


def test_a_verdict_under_another_threshold_than_the_ledgers_does_not_count(
    store: LedgerStore, clock: Clock
) -> None:
    submit = store_submitter(store)
    declare(submit, VERIFIER)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    beacon = next_beacon(store, clock)
    loose = check(CLIENT, VERIFIER, pairs, beacon, score="0.005", threshold="0.01")
    error = refused(store, pairs, loose)
    assert "applied threshold 0.01; the ledger's for this model under fp32 is 0.001" in str(error)
    # Once the operator publishes the model's calibration, the ledger holds later epochs'
    # verdicts to its threshold, and the profile's default no longer counts.
    calibration = Calibration(MODEL, PROFILE, 10_000, 2e-6, 1.9e-6, 10.0, 2.0, "measured")
    submit(LEDGER, "calibrate", {"calibrations": [calibration_to_wire(calibration)]})
    later = next_beacon(store, clock)
    default = check(CLIENT, VERIFIER, pairs, later)
    assert "applied threshold 0.001" in str(refused(store, pairs, default))
    calibrated = check(CLIENT, VERIFIER, pairs, later, threshold=repr(calibration.threshold))
    assert [p["credited_units"] for p in report(store, pairs, [calibrated])["pairs"]] == [20, 4]
    # A verdict of the epoch before the publication is still held to the default.
    assert report(store, pairs, [check(CLIENT, VERIFIER, pairs, beacon)])["pairs"]


def test_a_forged_or_unrevealed_beacon_does_not_count(store: LedgerStore, clock: Clock) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    forger = seed_identity("forger")
    forged = sign_beacon(forger, DEFAULT_ORIGIN, 1, beacon.epoch)
    error = refused(store, pairs, check(CLIENT, VERIFIER, pairs, forged))
    assert error.status_code == 400 and "is not this ledger's" in str(error)
    tampered = dataclasses.replace(beacon, signature=bytes(64))
    with pytest.raises(BadSignature, match="attestation 0"):
        report(store, pairs, [check(CLIENT, VERIFIER, pairs, tampered)])
    # Only the ledger can sign a future beacon; even so it counts only once its epoch began.
    future = sign_beacon(LEDGER, DEFAULT_ORIGIN, 1, beacon.epoch + 5)
    assert "has not begun" in str(refused(store, pairs, check(CLIENT, VERIFIER, pairs, future)))


def test_a_verdict_on_other_outputs_than_the_node_signed_does_not_count(
    store: LedgerStore, clock: Clock
) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=3)
    other = check(CLIENT, VERIFIER, pairs, beacon, node_chain=secrets.token_bytes(32))
    with pytest.raises(BadReceipt, match=r"attestation 0: .*judged other outputs"):
        report(store, pairs, [other])
    with pytest.raises(BadReceipt, match="lacks the node's step 2"):
        report(store, pairs[:2], [check(CLIENT, VERIFIER, pairs, beacon)])


def test_a_verdict_whose_recomputation_is_not_in_the_report_does_not_count(
    store: LedgerStore, clock: Clock
) -> None:
    declare(store_submitter(store), VERIFIER)
    beacon = next_beacon(store, clock)
    pairs = make_pairs(CLIENT, NODE, steps=2)
    good = check(CLIENT, VERIFIER, pairs, beacon)
    swapped = make_receipt(
        VERIFIER, good.request, secrets.token_bytes(32), good.receipt.chain_digest
    )
    with pytest.raises(BadReceipt, match="not the recomputation its verdict names"):
        report(store, pairs, [dataclasses.replace(good, receipt=swapped)])
    short = check(CLIENT, VERIFIER, pairs, beacon, recomputed=3)
    with pytest.raises(BadReceipt, match="not over the verdict's positions"):
        report(store, pairs, [short])
    other_client = seed_identity("other-client")
    foreign = dataclasses.replace(
        good, request=check(other_client, VERIFIER, pairs, beacon).request
    )
    with pytest.raises(BadReceipt, match="asked by another client"):
        report(store, pairs, [foreign])


def test_a_version_1_attestation_credits_nothing(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE, steps=2)
    body = report_body(pairs, [])
    body["attestations"] = [
        {"node": NODE.public_key.hex(), "session": pairs[0][0].session_id.hex(), "start": 0,
         "end": 4, "steps": 2, "passed": True, "score": "1e-06",
         "request": "", "receipt": ""}
    ]  # fmt: skip
    with pytest.raises(InvalidInput, match="attestation 0: an attestation has exactly"):
        store_submitter(store)(CLIENT, "report", body)
    result = report(store, pairs, [])  # the client's word alone: nothing
    assert {pair["credited_units"] for pair in result["pairs"]} == {0}
    assert result["entries"] == []


def test_the_beacon_serving_and_calibration_routes_over_http(tmp_path: Path) -> None:
    key, db = tmp_path / "ledger.key", tmp_path / "ledger.db"
    save_identity(LEDGER, key)
    node, verifier = Identity.generate(), Identity.generate()
    model = secrets.token_bytes(32)
    with running_server(db, key) as server, LedgerClient(server.url, node) as as_node:
        current = as_node.beacon()
        assert current.ledger_key == LEDGER.public_key and current.period == 1
        assert as_node.beacon(current.epoch) == current
        for path, status in (
            (f"/v1/beacon/{current.epoch + 100}", 425),
            ("/v1/beacon/yesterday", 422),
            ("/v1/beacon/-1", 422),
        ):
            answer = httpx.get(server.url + path, timeout=10)
            assert answer.status_code == status and answer.json()["error"], path
        with pytest.raises(BadSignature):
            LedgerClient(server.url, ledger_key=NODE.public_key).beacon()

        as_node.declare_serving(model, 0, 8, "int8")
        with pytest.raises(LedgerRefused, match="already declares") as again:
            as_node.declare_serving(model, 0, 8, "int8")
        assert again.value.status_code == 409
        declare_over_http(server.url, verifier, model=model, blocks=(2, 8), profile="int8")
        epoch = wait_for_next_beacon(as_node).epoch
        assert as_node.servers(model, 2, 6, "int8", epoch) == sorted(
            [node.public_key, verifier.public_key]
        )
        assert as_node.servers(model, 0, 6, "int8", epoch) == [node.public_key]
        assert as_node.servers(model, 2, 6, "fp32", epoch) == []
        as_node.withdraw_serving(model, 0, 8, "int8")
        later = wait_for_next_beacon(as_node).epoch
        assert as_node.servers(model, 2, 6, "int8", later) == [verifier.public_key]
        assert node.public_key in as_node.servers(model, 2, 6, "int8", epoch)  # as it stood
        with pytest.raises(LedgerRefused) as unknown:
            as_node.withdraw_serving(model, 0, 8, "int8")
        assert unknown.value.status_code == 409
        ahead = httpx.get(
            f"{server.url}/v1/serving",
            params={"model": model.hex(), "start": 2, "end": 6, "profile": "int8",
                    "before": later + 100},
            timeout=10,
        )  # fmt: skip
        assert ahead.status_code == 425

        calibration = Calibration(model, "int8", 10_000, 3.1e-4, 2.9e-4, 3.0, 1.5, "measured")
        with pytest.raises(LedgerRefused, match="operator") as foreign:
            as_node.publish_calibrations([calibration])
        assert foreign.value.status_code == 403
        path = tmp_path / "corolla-tolerance.json"
        save_calibrations(path, [calibration])
        app = typer.Typer()
        register(app)
        published = CliRunner().invoke(
            app, ["ledger", "publish-tolerance", str(path), "--key", str(key), "--url", server.url]
        )
        assert published.exit_code == 0, published.output
        assert "threshold 0.00093" in published.output
        assert as_node.calibrations(model) == {"int8": calibration}
        assert as_node.calibrations(MODEL) == {}

        earned = earn(server.url, Identity.generate(), node)
        assert [pair["credited_units"] for pair in earned[0]["pairs"]] == [20, 4, 4]
        shown = CliRunner().invoke(
            app, ["ledger", "history", node.public_key.hex(), "--url", server.url, "--json"]
        )
        details = [entry["detail"] for entry in json.loads(shown.output)]
        assert any("no longer serves blocks [0, 8)" in detail for detail in details)
        source = HttpSource(server.url)
        try:
            audited = audit(source)
        finally:
            source.close()
        assert audited.kinds["serving_declared"] == 3  # two here, one by earn's verifier
        assert audited.kinds["calibration_published"] == 1
