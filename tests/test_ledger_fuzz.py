"""Bad input never makes the ledger fail: schemathesis drives every operation of its OpenAPI
document (half the bodies properly signed, so they reach the rules), and hypothesis submits
validly signed pairs with extreme field values and validly signed disputes with damaged bytes.
No answer is a 5xx; every 4xx says why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from ledger_fixtures import (
    LedgerServer,
    check,
    made_up_dispute,
    random_pair,
    running_server,
)

from corolla.errors import CorollaError, InvalidInput
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.models import b64encode
from corolla.ledger.api.reports import report_body
from corolla.verify.beacon import Beacon
from corolla.verify.encoding import INT_MAX, canonical
from corolla.verify.identity import Identity
from corolla.verify.receipts import MAX_BLOCK, MAX_TOKENS

ACTIONS = {
    "/v1/accounts": "register",
    "/v1/reports": "report",
    "/v1/tickets": "buy-ticket",
    "/v1/tickets/redeem": "redeem",
    "/v1/evidence": "evidence",
    "/v1/slash": "slash",
    "/v1/serving": "serving",
    "/v1/serving/withdraw": "serving-withdraw",
    "/v1/calibrations": "calibrate",
    "/v1/disputes": "dispute",
}
AUTHOR = Identity.generate()


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerServer]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    with running_server(directory / "ledger.db", directory / "ledger.key") as server:
        yield server


def sign_when_possible(case: schemathesis.Case) -> None:
    """Sign half of the bodies that can be signed, so that they get past the envelope."""
    action = ACTIONS.get(case.path)
    if case.method.upper() != "POST" or action is None:
        return
    try:
        data = canonical(case.body)
    except CorollaError:
        return
    if len(data) % 2 == 0:
        signed = sign_envelope(AUTHOR, action, data).to_headers()
        case.headers = {**(case.headers or {}), **signed}


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_generated_request_gets_a_server_error(
    ledger: LedgerServer, mode: schemathesis.GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{ledger.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 22
    exercised = 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def no_server_error(case: schemathesis.Case) -> None:
            sign_when_possible(case)
            response = case.call(base_url=ledger.url)
            assert response.status_code < 500, (case.method, case.path, response.text)
            if response.status_code >= 400:
                assert json.loads(response.text)["error"]

        try:
            no_server_error()
            exercised += 1
        except Unsatisfiable:
            # Operations without parameters have no invalid inputs to generate.
            assert mode is schemathesis.GenerationMode.NEGATIVE
    assert exercised >= 19


digests = st.binary(min_size=32, max_size=32)
big = st.integers(0, INT_MAX)


@given(
    start=st.integers(0, MAX_BLOCK - 1),
    width=st.integers(1, MAX_BLOCK),
    position=big,
    tokens=st.integers(1, MAX_TOKENS),
    step=big,
    ticket=st.none() | digests,
)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_signed_pairs_with_extreme_values_get_an_answer_not_a_crash(
    ledger: LedgerServer,
    start: int,
    width: int,
    position: int,
    tokens: int,
    step: int,
    ticket: bytes | None,
) -> None:
    client, node = Identity.generate(), Identity.generate()
    request, receipt = random_pair(
        client,
        node,
        start=start,
        end=min(start + width, MAX_BLOCK),
        step=step,
        position=position,
        tokens=tokens,
        ticket=ticket,
    )
    beacon = Beacon.from_dict(httpx.get(ledger.url + "/v1/beacon", timeout=30).json())
    try:
        checks = [check(client, Identity.generate(), [(request, receipt)], beacon)]
    except InvalidInput:
        checks = []  # positions past what a verdict can name: report the pair alone
    reported = report_body([(request, receipt)], checks)
    redeemed = {"pairs": [{"request": request.to_dict(), "receipt": receipt.to_dict()}]}
    for path, action, author, body in (
        ("/v1/reports", "report", client, reported),
        ("/v1/tickets/redeem", "redeem", node, redeemed),
    ):
        headers = sign_envelope(author, action, canonical(body)).to_headers()
        response = httpx.post(ledger.url + path, json=body, headers=headers, timeout=30)
        assert response.status_code < 500, response.text
        assert response.status_code == 200 or response.json()["error"]


DISPUTER = Identity.generate()
DISPUTE = made_up_dispute(DISPUTER, Identity.generate(), Identity.generate())


@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(DISPUTE.to_bytes()) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cut=st.none() | st.integers(0, len(DISPUTE.to_bytes()) - 1),
)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_signed_disputes_with_damaged_bytes_get_an_answer_not_a_crash(
    ledger: LedgerServer, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(DISPUTE.to_bytes())
    for position, value in edits:
        data[position] = value
    damaged = bytes(data if cut is None else data[:cut])
    body = {"dispute": b64encode(damaged)}
    headers = sign_envelope(DISPUTER, "dispute", canonical(body)).to_headers()
    response = httpx.post(ledger.url + "/v1/disputes", json=body, headers=headers, timeout=60)
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 202) or response.json()["error"]
