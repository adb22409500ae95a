"""The accounting rules, in process on a real SQLite file: credit for checked work, no double
credit, tickets, slashing, reputation, replay protection; and the auditor agrees with the
ledger after each. (Checks in detail: test_ledger_checks_v2.py and test_ledger_attested.py;
evidence: test_ledger_evidence.py; disputes: test_ledger_disputes.py.) VERIFIER declares
serving every span the tests use before the ledger's clock enters the epoch whose beacon
assigns every check here, so it is the assigned verifier of each."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_fixtures import (
    check,
    declare,
    made_up_evidence,
    make_pairs,
    next_beacon,
    pair_dicts,
    seed_identity,
    store_submitter,
)

from corolla.errors import BadReceipt, BadSignature, LedgerRefused
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.models import b64encode
from corolla.ledger.api.reports import Attestation, report_body
from corolla.ledger.audit import audit
from corolla.ledger.config import LedgerRules
from corolla.ledger.rules import SignedPair, area, uncovered, verify_pairs
from corolla.ledger.sources import DbSource
from corolla.ledger.store import LedgerStore
from corolla.verify import make_receipt
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest
from corolla.verify.tickets import Ticket

LEDGER = seed_identity("ledger")
CLIENT = seed_identity("client")
NODE_A = seed_identity("node-a")
NODE_B = seed_identity("node-b")
VERIFIER = seed_identity("verifier")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def checking(store: LedgerStore, clock: Clock) -> LedgerStore:
    """``store`` once VERIFIER declared serving and a beacon epoch began."""
    declare(store_submitter(store), VERIFIER)
    next_beacon(store, clock)  # type: ignore[arg-type]
    return store


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    ledger = LedgerStore(tmp_path / "ledger.db", LEDGER, clock=clock)
    yield checking(ledger, clock)
    ledger.close()


def attest(
    store: LedgerStore, client: Identity, pairs: list[tuple[StepRequest, Receipt]]
) -> Attestation:
    """VERIFIER's passed check of all of ``pairs``, assigned by the current epoch's beacon."""
    return check(client, VERIFIER, pairs, store.beacon())


def submit(store: LedgerStore, author: Identity, action: str, body: Any) -> dict[str, Any]:
    data = canonical(body)
    return store.submit(sign_envelope(author, action, data, timestamp=store.clock()), body)


def balance(store: LedgerStore, key: bytes) -> int:
    account = store._reader.account(key)
    return 0 if account is None else account.balance


def signed(pairs: list[tuple[StepRequest, Receipt]]) -> list[SignedPair]:
    return [(r, r.signing_bytes(), c, c.signing_bytes()) for r, c in pairs]


def audited(path: Path) -> None:
    source = DbSource(path)
    try:
        audit(source)
    finally:
        source.close()


def report(
    store: LedgerStore,
    client: Identity,
    pairs: list[tuple[StepRequest, Receipt]],
    attestations: list[Attestation],
) -> dict[str, Any]:
    return submit(store, client, "report", report_body(pairs, attestations))


def checked(store: LedgerStore, client: Identity, node: Identity, **options: Any) -> dict[str, Any]:
    """Report one node-session, fully checked by VERIFIER."""
    pairs = make_pairs(client, node, **options)
    return report(store, client, pairs, [attest(store, client, pairs)])


def test_checked_work_is_credited_per_block_token(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE_A, steps=4, start=2, end=6, prefill=5)
    result = report(store, CLIENT, pairs, [attest(store, CLIENT, pairs)])
    assert [p["credited_units"] for p in result["pairs"]] == [20, 4, 4, 4]
    assert balance(store, NODE_A.public_key) == 32
    assert result["attestations"] == [{"attestation": 0, "counted": True, "fee": 3, "units": 32}]
    audited(store.path)


def test_a_double_report_of_the_same_receipts_credits_once(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE_A, steps=3)
    checks = [attest(store, CLIENT, pairs)]
    report(store, CLIENT, pairs, checks)
    again = report(store, CLIENT, pairs, checks)
    assert again["entries"] == []
    assert balance(store, NODE_A.public_key) == 4 * 7
    assert balance(store, VERIFIER.public_key) == 2
    audited(store.path)


def test_a_failover_replay_earns_only_the_blocks_and_tokens_it_adds(store: LedgerStore) -> None:
    session = bytes(range(16))
    checked(store, CLIENT, NODE_A, session=session, steps=3, start=0, end=4)
    # Node B replaces A and replays the same positions over a wider span, then goes on.
    replay = make_pairs(CLIENT, NODE_B, session=session, steps=4, start=0, end=6)
    result = report(store, CLIENT, replay, [attest(store, CLIENT, replay)])
    assert [p["credited_units"] for p in result["pairs"]] == [2 * 5, 2 * 1, 2 * 1, 6 * 1]
    assert balance(store, NODE_A.public_key) == 4 * 7
    assert balance(store, NODE_B.public_key) == 20
    audited(store.path)


def test_a_forged_or_unbound_pair_is_refused_and_nothing_is_credited(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE_A, steps=3)
    request, receipt = pairs[1]
    forged = [pairs[0], (request, dataclasses.replace(receipt, tokens=9)), pairs[2]]
    with pytest.raises(BadSignature, match="pair 1"):
        report(store, CLIENT, forged, [attest(store, CLIENT, pairs)])
    other = make_pairs(CLIENT, NODE_A, steps=1)[0][0]
    unbound = [(other, make_receipt(NODE_A, request, receipt.output_digest, bytes(32)))]
    with pytest.raises(BadReceipt, match="pair 0"):
        report(store, CLIENT, unbound, [])
    assert store._reader.size() == 3  # genesis, and the verifier declared serving


def test_a_report_must_come_from_the_client_of_every_pair(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE_A, steps=2)
    with pytest.raises(BadReceipt, match="pair 0: the request is client"):
        report(store, NODE_A, pairs, [attest(store, CLIENT, pairs)])
    assert store._reader.size() == 3  # genesis, and the verifier declared serving


def test_consecutive_steps_must_extend_the_chain_digest() -> None:
    pairs = make_pairs(CLIENT, NODE_A, steps=3)
    request, _ = pairs[2]
    off_chain = make_receipt(NODE_A, request, bytes(32), bytes(32))
    with pytest.raises(BadReceipt, match=r"pair 2: .*chain"):
        verify_pairs(signed([pairs[0], pairs[1], (request, off_chain)]), reporter=None)
    # Alone, the same receipt has no previous step to chain from, and verifies.
    assert verify_pairs(signed([(request, off_chain)]), reporter=None)[0].units == 4
    # A first step must start the chain.
    first = pairs[0][0]
    unchained = make_receipt(NODE_A, first, bytes(32), b"\x01" * 32)
    with pytest.raises(BadReceipt, match="chain"):
        verify_pairs(signed([(first, unchained)]), reporter=None)


def test_tickets_are_bought_with_points_and_never_redeemed_beyond_budget(
    store: LedgerStore,
) -> None:
    checked(store, NODE_B, CLIENT, steps=6)
    assert balance(store, CLIENT.public_key) == 4 * 10
    bought = submit(store, CLIENT, "buy-ticket", {"budget": 12, "ttl_s": 60})
    ticket = Ticket.from_dict(bought["ticket"])
    assert balance(store, CLIENT.public_key) == 28
    with pytest.raises(LedgerRefused, match="insufficient balance"):
        submit(store, CLIENT, "buy-ticket", {"budget": 29, "ttl_s": 60})
    work = make_pairs(CLIENT, NODE_A, steps=4, prefill=1, ticket=ticket.digest())
    paid = submit(store, NODE_A, "redeem", {"pairs": pair_dicts(work)})
    assert [p["redeemed_units"] for p in paid["pairs"]] == [4, 4, 4, 0]
    assert "over the ticket's budget" in paid["pairs"][3]["refused"]
    assert balance(store, NODE_A.public_key) == 12
    with pytest.raises(LedgerRefused, match="already redeemed"):
        submit(store, NODE_A, "redeem", {"pairs": pair_dicts(work[:1])})
    audited(store.path)


def test_expired_and_foreign_tickets_are_not_redeemed(store: LedgerStore, clock: Clock) -> None:
    checked(store, NODE_B, CLIENT, steps=2)
    ticket = Ticket.from_dict(
        submit(store, CLIENT, "buy-ticket", {"budget": 8, "ttl_s": 1})["ticket"]
    )
    foreign = make_pairs(NODE_B, NODE_A, steps=1, prefill=1, ticket=ticket.digest())
    with pytest.raises(LedgerRefused, match="another client"):
        submit(store, NODE_A, "redeem", {"pairs": pair_dicts(foreign)})
    clock.now += 1000 + store.rules.redeem_grace_s * 1000 + 1
    late = make_pairs(CLIENT, NODE_A, steps=1, prefill=1, ticket=ticket.digest())
    with pytest.raises(LedgerRefused, match="expired"):
        submit(store, NODE_A, "redeem", {"pairs": pair_dicts(late)})
    audited(store.path)


def test_slashing_takes_the_balance_zeroes_reputation_and_is_operator_only(
    store: LedgerStore,
) -> None:
    for _ in range(3):
        checked(store, CLIENT, NODE_A, steps=2)
    account = store._reader.account(NODE_A.public_key)
    assert account is not None and account.reputation == 3 and account.balance == 3 * 24
    # One verifier alone convicts nobody: the evidence is logged unjudged.
    logged = submit(
        store,
        CLIENT,
        "evidence",
        {"evidence": b64encode(made_up_evidence(CLIENT, NODE_A, [VERIFIER]).to_bytes())},
    )
    assert logged["verdict"] == "unjudged" and logged["taken"] == 0
    body = {
        "account": NODE_A.public_key.hex(),
        "reason": "the operator read the evidence",
        "evidence": logged["evidence_digest"],
    }
    with pytest.raises(LedgerRefused, match="operator"):
        submit(store, CLIENT, "slash", body)
    with pytest.raises(LedgerRefused, match="fraud evidence in the log"):
        submit(store, LEDGER, "slash", {**body, "evidence": "ab" * 32})
    assert submit(store, LEDGER, "slash", body)["taken"] == 72
    account = store._reader.account(NODE_A.public_key)
    assert account is not None and (account.balance, account.reputation) == (0, 0)
    assert account.slashed
    with pytest.raises(LedgerRefused, match="already slashed"):
        submit(store, LEDGER, "slash", body)
    # A slashed node earns nothing more.
    after = checked(store, CLIENT, NODE_A, steps=2)
    assert {p["reason"] for p in after["pairs"]} == {"the node was slashed"}
    assert balance(store, NODE_A.public_key) == 0
    audited(store.path)


def test_reputation_is_slow_to_earn_and_capped(tmp_path: Path, clock: Clock) -> None:
    store = LedgerStore(tmp_path / "l.db", LEDGER, clock=clock, rules=LedgerRules(reputation_cap=2))
    checking(store, clock)
    pairs = make_pairs(CLIENT, NODE_A, steps=6)
    earned = []
    for steps in (2, 4, 6):  # one session checked and reported three times: +1 only once
        result = report(store, CLIENT, pairs[:steps], [attest(store, CLIENT, pairs[:steps])])
        earned.append(sum(p["credited_units"] for p in result["pairs"]))
    assert earned == [24, 8, 8]
    assert store._reader.account(NODE_A.public_key).reputation == 1  # type: ignore[union-attr]
    for _ in range(3):
        checked(store, CLIENT, NODE_A, steps=1)
    assert store._reader.account(NODE_A.public_key).reputation == 2  # type: ignore[union-attr]
    store.close()
    audited(tmp_path / "l.db")


def test_replayed_and_stale_requests_are_refused(store: LedgerStore, clock: Clock) -> None:
    body = {"name": "alice"}
    data = canonical(body)
    envelope = sign_envelope(CLIENT, "register", data, timestamp=clock.now)
    store.submit(envelope, body)
    with pytest.raises(LedgerRefused, match="replayed") as replay:
        store.submit(envelope, body)
    assert replay.value.status_code == 409
    stale = sign_envelope(NODE_A, "register", data, timestamp=clock.now - 121_000)
    with pytest.raises(LedgerRefused, match="clock") as refused:
        store.submit(stale, body)
    assert refused.value.status_code == 401
    other = sign_envelope(NODE_A, "register", data, timestamp=clock.now)
    with pytest.raises(LedgerRefused, match="signature covers"):
        store.submit(other, {"name": "mallory"})


def test_concurrent_reports_of_the_same_work_credit_it_once(store: LedgerStore) -> None:
    pairs = make_pairs(CLIENT, NODE_A, steps=5)
    checks = [attest(store, CLIENT, pairs)]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            report(store, CLIENT, pairs, checks)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert balance(store, NODE_A.public_key) == 4 * 9
    assert balance(store, VERIFIER.public_key) == 4 * 9 // 10
    audited(store.path)


rects = st.tuples(st.integers(0, 6), st.integers(1, 4), st.integers(0, 6), st.integers(1, 4)).map(
    lambda r: (r[0], r[0] + r[1], r[2], r[2] + r[3])
)


@settings(max_examples=200, deadline=None)
@given(rect=rects, covered=st.lists(rects, max_size=5))
def test_uncovered_pieces_are_exactly_the_cells_no_earlier_credit_covered(
    rect: tuple[int, int, int, int], covered: list[tuple[int, int, int, int]]
) -> None:
    pieces = uncovered(rect, covered)

    def cells(r: tuple[int, int, int, int]) -> set[tuple[int, int]]:
        return set(itertools.product(range(r[0], r[1]), range(r[2], r[3])))

    free = cells(rect) - set().union(*(cells(c) for c in covered))
    piece_cells = [cells(piece) for piece in pieces]
    assert sum(area(piece) for piece in pieces) == len(free)
    assert set().union(*piece_cells) == free


def test_verified_steps_carry_the_official_request_and_receipt_digests() -> None:
    pairs = make_pairs(CLIENT, NODE_A, steps=3)
    steps = verify_pairs(signed(pairs), reporter=CLIENT.public_key)
    for step, (request, receipt) in zip(steps, pairs, strict=True):
        assert step.request_digest == request.digest() == receipt.request_digest
        assert step.receipt_digest == receipt.digest()
