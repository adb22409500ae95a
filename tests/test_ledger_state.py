"""Both forms of the derived state, the ledger's SQLite tables and the auditor's memory, refuse
the same entries for the same reasons: one list of invariants, read by both before they write.
Each refusal leaves the state as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corolla.errors import LedgerRefused
from corolla.ledger.api.checks import Serving, calibration_to_wire
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.models import Account, Draft
from corolla.ledger.config import LedgerRules
from corolla.ledger.memory import MemoryState
from corolla.ledger.sql_state import SqlState
from corolla.ledger.state import INVARIANTS, LedgerState
from corolla.ledger.store import LedgerStore
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity
from corolla.verify.tickets import Ticket
from corolla.verify.tolerance import Calibration

NODE = b"\x01" * 32
CLIENT = b"\x02" * 32
SESSION = b"\x03" * 16
TICKET = Ticket(
    ledger_key=b"\x04" * 32,
    client_key=CLIENT,
    budget=5,
    price=1,
    expiry=1_900_000_000_000,
    serial=b"\x05" * 32,
    signature=b"\x06" * 64,
)


def register(key: bytes) -> Draft:
    return Draft("account_registered", key, 0, b"", {"name": ""})


def credit(amount: int, *pieces: list[int]) -> Draft:
    payload = {"client": CLIENT, "session": SESSION, "pieces": list(pieces)}
    return Draft("work_credited", NODE, amount, b"\x07" * 32, payload)


def redeem(request: bytes, units: int, ticket: bytes | None = None) -> Draft:
    payload = {"ticket": ticket or TICKET.digest(), "units": units}
    return Draft("ticket_redeemed", NODE, units, request, payload)


def bought() -> Draft:
    return Draft("ticket_bought", CLIENT, 0, TICKET.digest(), {"ticket": TICKET.to_value()})


def fee(*pieces: list[int]) -> Draft:
    payload = {"client": CLIENT, "session": SESSION, "pieces": list(pieces), "units": 1}
    return Draft("verifier_fee", NODE, 1, b"\x08" * 32, payload)


def evidence(digest: bytes) -> Draft:
    return Draft("fraud_evidence", NODE, 0, digest, {"verdict": "unjudged"})


def dispute(digest: bytes) -> Draft:
    return Draft("dispute", NODE, 0, digest, {"judged": False})


SERVING = Serving(b"\x0e" * 32, 0, 8, "fp32")


def serving(kind: str, time: int = 5) -> Draft:
    payload = {**SERVING.to_body(), "model": SERVING.model_digest, "time": time}
    return Draft(kind, NODE, 0, b"", payload)


def published(author: bytes) -> Draft:
    calibration = Calibration(b"\x0e" * 32, "fp32", 10, 1e-6, 1e-6, 10.0, 2.0, "measured")
    payload = {"calibration": calibration_to_wire(calibration), "time": 5}
    return Draft("calibration_published", author, 0, calibration.model_digest, payload)


@dataclass(frozen=True)
class Case:
    """Entries a state accepts, then one it must refuse, and why."""

    before: tuple[Draft, ...]
    refused: Draft
    reason: str


CASES = {
    "double registration": Case((register(NODE),), register(NODE), "already registered"),
    "unregistered account": Case((), fee([0, 1, 0, 1]), "never registered"),
    "negative balance": Case(
        (register(NODE),), Draft("slash", NODE, -1, b"\x09" * 32, {}), "negative"
    ),
    "negative reputation": Case(
        (register(NODE),), Draft("reputation_changed", NODE, -1, b"", {}), "negative"
    ),
    "double credit": Case(
        (register(NODE), credit(8, [0, 2, 0, 4])), credit(4, [1, 3, 3, 5]), "already credited"
    ),
    "overlapping pieces in one credit": Case(
        (register(NODE),), credit(8, [0, 2, 0, 2], [1, 2, 1, 3]), "already credited"
    ),
    "ticket sold twice": Case((register(CLIENT), bought()), bought(), "already sold"),
    "ticket never sold": Case((register(NODE),), redeem(b"\x0a" * 32, 1), "never sold"),
    "ticket overspent": Case(
        (register(CLIENT), bought(), register(NODE), redeem(b"\x0a" * 32, 4)),
        redeem(b"\x0b" * 32, 2),
        "beyond its budget",
    ),
    "request redeemed twice": Case(
        (register(CLIENT), bought(), register(NODE), redeem(b"\x0a" * 32, 1)),
        redeem(b"\x0a" * 32, 1),
        "already redeemed",
    ),
    "double fee": Case((register(NODE), fee([0, 4, 0, 4])), fee([2, 3, 3, 9]), "same positions"),
    "overlapping pieces in one fee": Case(
        (register(NODE),), fee([0, 2, 0, 2], [1, 2, 1, 3]), "same positions"
    ),
    "double evidence": Case((evidence(b"\x0d" * 32),), evidence(b"\x0d" * 32), "evidence or"),
    "a dispute twice": Case((dispute(b"\x0d" * 32),), evidence(b"\x0d" * 32), "dispute twice"),
    "declared twice": Case(
        (register(NODE), serving("serving_declared")), serving("serving_declared", 9), "already"
    ),
    "withdrawn undeclared": Case(
        (register(NODE), serving("serving_declared"), serving("serving_withdrawn")),
        serving("serving_withdrawn", 9),
        "not in force",
    ),
    "calibration by another": Case((), published(NODE), "not the ledger's"),
}


def test_every_invariant_has_a_case() -> None:
    reasons = [case.reason for case in CASES.values()]
    for invariant in INVARIANTS:
        assert any(reason in invariant.refusal for reason in reasons), invariant.refusal


StateFactory = Callable[[], LedgerState]


@pytest.fixture(params=["memory", "sql"])
def make_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateFactory]:
    """A fresh, empty state of either kind (the SQL one inside an open write transaction, as
    the store uses it)."""
    if request.param == "memory":
        yield lambda: MemoryState(b"\x04" * 32, LedgerRules(), "test")
        return
    store = LedgerStore(tmp_path / "ledger.db", Identity.generate())
    envelope = sign_envelope(store.identity, "register", canonical({"name": ""}))
    conn = store._conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        size = store._reader.size()
        yield lambda: SqlState(store, (1, envelope, 1_800_000_000_000), size)
    finally:
        conn.execute("ROLLBACK")
        store.close()


def snapshot(state: LedgerState) -> tuple[object, ...]:
    """What a refused entry must not change."""
    keys = (NODE, CLIENT)
    accounts: list[Account | None] = [state.account(key) for key in keys]
    ticket = state.ticket(TICKET.digest())
    covered = state.covered(CLIENT, SESSION, (0, 10, 0, 10))
    paid = state.paid(NODE, CLIENT, SESSION, (0, 10, 0, 10))
    servers = state.servers(SERVING, 10)
    size = state.next_seq if isinstance(state, SqlState) else len(state.drafts)  # type: ignore[attr-defined]
    return (*accounts, ticket, sorted(covered), sorted(paid), servers, size)


@pytest.mark.parametrize("name", list(CASES))
def test_both_states_refuse_the_entry_and_change_nothing(
    make_state: StateFactory, name: str
) -> None:
    case = CASES[name]
    state = make_state()
    for draft in case.before:
        state.append(draft)
    before = snapshot(state)
    with pytest.raises(LedgerRefused, match=case.reason) as refused:
        state.append(case.refused)
    assert refused.value.status_code == 409
    assert snapshot(state) == before


def test_a_refused_entry_writes_no_row_in_the_sql_log(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.db", Identity.generate())
    envelope = sign_envelope(store.identity, "register", canonical({"name": ""}))
    conn = store._conn
    rows = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    try:
        state = SqlState(store, (1, envelope, 1_800_000_000_000), rows)
        state.append(register(NODE))
        with pytest.raises(LedgerRefused):
            state.append(register(NODE))
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == rows + 1
        assert state.next_seq == rows + 1
    finally:
        conn.execute("ROLLBACK")
        store.close()
