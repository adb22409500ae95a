"""Tampering with a ledger's database by hand makes ``corolla ledger audit`` fail loudly and
name the entry at fault; a ledger that rewrites its history between two audits is caught by
the consistency check against the checkpoint the auditor remembered."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_fixtures import (
    MODEL,
    Clock,
    check,
    declare,
    declare_over_http,
    made_up_dispute,
    made_up_evidence,
    make_pairs,
    next_beacon,
    pair_dicts,
    running_server,
    seed_identity,
    store_submitter,
    wait_for_next_beacon,
)
from typer.testing import CliRunner, Result

from corolla.ledger.api.checks import Serving, calibration_to_wire
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.models import Entry, b64encode
from corolla.ledger.api.reports import report_body
from corolla.ledger.cli import register
from corolla.ledger.entries import KINDS, raw_leaf_hash
from corolla.ledger.reader import LedgerReader
from corolla.ledger.store import LedgerStore
from corolla.verify.encoding import INT_MAX, INT_MIN
from corolla.verify.identity import Identity, save_identity
from corolla.verify.tickets import Ticket
from corolla.verify.tolerance import Calibration

LEDGER = seed_identity("ledger")
CLIENT = seed_identity("client")
NODE_A = seed_identity("node-a")
NODE_B = seed_identity("node-b")
VERIFIER = seed_identity("verifier")


def build_ledger(path: Path) -> None:
    """A small log with every kind of entry."""
    clock = Clock()
    store = LedgerStore(path, LEDGER, clock=clock)
    submit = store_submitter(store)

    def checked(client: Identity, node: Identity, steps: int) -> dict[str, Any]:
        pairs = make_pairs(client, node, steps=steps)
        attestation = check(client, VERIFIER, pairs, store.beacon())
        return submit(client, "report", report_body(pairs, [attestation]))

    try:
        submit(NODE_A, "register", {"name": "node-a"})
        declare(submit, VERIFIER)
        declare(submit, NODE_B)
        submit(NODE_B, "serving-withdraw", Serving(MODEL, 0, 64, "fp32").to_body())
        calibration = Calibration(MODEL, "int8", 10_000, 2e-4, 1e-4, 4.0, 2.0, "measured")
        submit(LEDGER, "calibrate", {"calibrations": [calibration_to_wire(calibration)]})
        next_beacon(store, clock)
        checked(CLIENT, NODE_A, 3)
        checked(NODE_A, CLIENT, 4)
        dispute = made_up_dispute(NODE_A, NODE_B, VERIFIER)
        submit(NODE_A, "dispute", {"dispute": b64encode(dispute.to_bytes())})
        bought = submit(CLIENT, "buy-ticket", {"budget": 8, "ttl_s": 600})
        ticket = Ticket.from_dict(bought["ticket"]).digest()
        ticketed = make_pairs(CLIENT, NODE_B, steps=2, prefill=4, ticket=ticket)
        submit(NODE_B, "redeem", {"pairs": pair_dicts(ticketed)})
        evidence = made_up_evidence(CLIENT, NODE_B, [VERIFIER, NODE_A])
        submit(CLIENT, "evidence", {"evidence": b64encode(evidence.to_bytes())})
        unjudged = made_up_evidence(NODE_A, CLIENT, [VERIFIER])
        logged = submit(NODE_A, "evidence", {"evidence": b64encode(unjudged.to_bytes())})
        body = {
            "account": CLIENT.public_key.hex(),
            "reason": "r",
            "evidence": logged["evidence_digest"],
        }
        submit(LEDGER, "slash", body)
    finally:
        store.close()


def run_audit(*args: str) -> Result:
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["ledger", "audit", *args])


def kind_of(db: Path, kind: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT MIN(seq) FROM entries WHERE kind = ?", (kind,)).fetchone()[0]


def tamper(db: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(db)
    with conn:
        for sql, parameters in statements:
            conn.execute(sql, parameters)
    conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    build_ledger(path)
    result = run_audit("--db", str(path))
    assert result.exit_code == 0, result.output
    return path


def test_an_untouched_ledger_passes_the_audit_with_a_summary(db: Path) -> None:
    result = run_audit("--db", str(db))
    assert result.exit_code == 0
    assert "audit of corolla-ledger passed" in result.output
    assert "receipts re-verified" in result.output


def test_the_log_holds_every_kind_of_entry(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        kinds = {row[0] for row in conn.execute("SELECT DISTINCT kind FROM entries")}
    assert kinds == set(KINDS)


def test_a_check_the_ledger_counted_from_a_forged_serving_table_fails_the_audit(
    db: Path,
) -> None:
    # The operator slips a verifier of its choice into the cached declarations...
    rogue = seed_identity("rogue-verifier")
    tamper(
        db,
        (
            "INSERT INTO serving VALUES (10000, ?, ?, 0, 64, 'fp32', 0, ?)",
            (rogue.public_key, MODEL, 2**62),
        ),
    )
    # ...so the ledger counts that verifier's check of a session...
    clock = Clock()
    store = LedgerStore(db, LEDGER, clock=clock)
    try:
        beacon = next_beacon(store, clock)
        pairs = make_pairs(CLIENT, seed_identity("node-c"), steps=2)
        body = report_body(pairs, [check(CLIENT, rogue, pairs, beacon)])
        result = store_submitter(store)(CLIENT, "report", body)
        assert [pair["credited_units"] for pair in result["pairs"]] == [20, 4]
        seq = result["entries"][0]
    finally:
        store.close()
    # ...and the auditor, who rebuilds the declarations from the log, finds it was not assigned.
    audited = run_audit("--db", str(db))
    assert audited.exit_code == 1
    assert f"entry {seq}: its operation breaks the rules: attestation 0:" in audited.output
    assert "had not declared serving" in audited.output


def test_changing_one_amount_fails_the_audit_naming_the_entry(db: Path) -> None:
    seq = kind_of(db, "work_credited")
    tamper(db, ("UPDATE entries SET amount = amount + 1 WHERE seq = ?", (seq,)))
    result = run_audit("--db", str(db))
    assert result.exit_code == 1
    assert f"entry {seq}: its content does not hash to its leaf hash" in result.output


def test_deleting_an_entry_fails_the_audit_naming_it(db: Path) -> None:
    seq = kind_of(db, "ticket_bought")
    tamper(db, ("DELETE FROM entries WHERE seq = ?", (seq,)))
    result = run_audit("--db", str(db))
    assert result.exit_code == 1
    assert f"entry {seq}: missing from the log" in result.output


def test_reordering_two_entries_fails_the_audit_naming_the_first(db: Path) -> None:
    first = kind_of(db, "work_credited")
    tamper(
        db,
        ("UPDATE entries SET seq = -1 WHERE seq = ?", (first,)),
        ("UPDATE entries SET seq = ? WHERE seq = ?", (first, first + 1)),
        ("UPDATE entries SET seq = ? WHERE seq = -1", (first + 1,)),
    )
    result = run_audit("--db", str(db))
    assert result.exit_code == 1
    assert f"entry {first}:" in result.output


def test_swapping_a_signature_fails_the_audit_naming_the_entry(db: Path) -> None:
    seq = kind_of(db, "ticket_redeemed")
    tamper(
        db,
        (
            "UPDATE entries SET author_signature = "
            "(SELECT author_signature FROM entries WHERE seq = 1) WHERE seq = ?",
            (seq,),
        ),
    )
    result = run_audit("--db", str(db))
    assert result.exit_code == 1
    assert f"entry {seq}:" in result.output


def test_a_consistent_forgery_of_amount_and_leaf_hash_is_found_by_the_root_search(
    db: Path,
) -> None:
    seq = kind_of(db, "ticket_redeemed")
    conn = sqlite3.connect(db)

    entry = LedgerReader(conn).entries(seq, 1)[0]
    forged = entry.__class__(
        **{**{f: getattr(entry, f) for f in entry.__slots__}, "amount": entry.amount * 10}
    )
    with conn:
        conn.execute(
            "UPDATE entries SET amount = ?, leaf_hash = ? WHERE seq = ?",
            (forged.amount, forged.leaf_hash(), seq),
        )
    conn.close()
    result = run_audit("--db", str(db))
    assert result.exit_code == 1
    # A leaf and its sibling are committed only together (by their parent's hash, which the
    # forger could not change): the search names one of the two.
    named = [
        f"entry {n}: the log's entries do not hash to the signed checkpoint" for n in (seq, seq ^ 1)
    ]
    assert any(message in result.output for message in named), result.output


def edit_operation_behind(db: Path, kind: str, marker: bytes) -> int:
    """Change one base64 character of the stored operation behind the first ``kind`` entry,
    in the record after ``marker``; returns that operation's first entry."""
    seq = kind_of(db, kind)
    with sqlite3.connect(db) as conn:
        op, body = conn.execute(
            "SELECT o.op, o.body FROM operations o JOIN entries e ON e.op = o.op WHERE e.seq = ?",
            (seq,),
        ).fetchone()
        first = conn.execute("SELECT MIN(seq) FROM entries WHERE op = ?", (op,)).fetchone()[0]
    position = body.index(marker) + len(marker) + 40
    letter = b"B" if body[position : position + 1] == b"A" else b"A"
    edited = body[:position] + letter + body[position + 1 :]
    tamper(db, ("UPDATE operations SET body = ? WHERE op = ?", (edited, op)))
    return first


def test_editing_a_receipt_inside_a_stored_report_fails_the_audit(db: Path) -> None:
    first = edit_operation_behind(db, "work_credited", b'"receipt":"')
    result = run_audit("--db", str(db))
    assert result.exit_code == 1
    assert f"entry {first}: it does not match the signed operation behind it" in result.output


def test_a_forged_cached_balance_fails_the_audit(db: Path) -> None:
    tamper(
        db, ("UPDATE accounts SET balance = balance + 1000 WHERE account = ?", (NODE_A.public_key,))
    )
    result = run_audit("--db", str(db), "--json")
    assert result.exit_code == 1
    assert "the ledger serves balance" in result.output


def test_a_ledger_that_rewrites_history_between_two_audits_is_caught(tmp_path: Path) -> None:
    db, key, state = tmp_path / "ledger.db", tmp_path / "ledger.key", tmp_path / "audit.json"
    save_identity(LEDGER, key)
    node = Identity.generate()

    def checked(ledger: LedgerClient, steps: int) -> None:
        pairs = make_pairs(CLIENT, node, steps=steps)
        ledger.submit_report(pairs, [check(CLIENT, VERIFIER, pairs, ledger.beacon())])

    with running_server(db, key) as server, LedgerClient(server.url, CLIENT) as ledger:
        declare_over_http(server.url, VERIFIER)
        wait_for_next_beacon(ledger)
        checked(ledger, 2)
        shutil.copy(db, tmp_path / "before.db")  # a consistent snapshot (WAL checkpointed)
        for path in ("-wal", "-shm"):
            source = Path(str(db) + path)
            if source.exists():
                shutil.copy(source, tmp_path / f"before.db{path}")
        checked(ledger, 3)
        first = run_audit("--url", server.url, "--state", str(state))
        assert first.exit_code == 0, first.output
    # The operator forks the log from the earlier snapshot and writes another future.
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
        if Path(str(tmp_path / "before.db") + suffix).exists():
            shutil.copy(str(tmp_path / "before.db") + suffix, str(db) + suffix)
    with running_server(db, key) as server, LedgerClient(server.url, CLIENT) as ledger:
        for _ in range(3):
            checked(ledger, 3)
        again = run_audit("--url", server.url, "--state", str(state))
        fresh = run_audit("--url", server.url)
    assert again.exit_code == 1
    assert "history was rewritten" in again.output
    assert fresh.exit_code == 0, fresh.output  # the fork alone is a valid log: only memory shows it


def test_a_checkpoint_signed_by_another_key_than_the_remembered_one_fails(
    db: Path, tmp_path: Path
) -> None:
    state = tmp_path / "audit.json"
    assert run_audit("--db", str(db), "--state", str(state)).exit_code == 0
    impostor = tmp_path / "impostor.db"
    LedgerStore(impostor, Identity.generate()).close()
    result = run_audit("--db", str(impostor), "--state", str(state))
    assert result.exit_code == 1
    assert "expected the ledger's key" in result.output


payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@settings(max_examples=100, deadline=None)
@given(payload=payloads, seq=st.integers(0, INT_MAX), amount=st.integers(INT_MIN, INT_MAX))
def test_leaf_hashes_from_stored_payload_bytes_equal_the_entries_own(
    payload: Any, seq: int, amount: int
) -> None:
    entry = Entry(
        seq=seq,
        kind="work_credited",
        account=bytes(32),
        amount=amount,
        ref=b"\x01" * 32,
        payload=payload,
        op=7,
        op_digest=b"\x02" * 32,
        author=b"\x03" * 32,
        author_signature=b"\x04" * 64,
        time=1_800_000_000_000,
    )
    assert raw_leaf_hash(entry.raw()) == entry.leaf_hash()
    other = dataclasses.replace(entry, kind="verifier_fee")
    assert raw_leaf_hash(other.raw()) != entry.leaf_hash()
