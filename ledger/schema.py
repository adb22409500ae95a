"""The ledger's SQLite schema (strict tables through sqlite-utils) and connection settings.

Tables: ``entries`` (the append-only log, one Merkle leaf per row), ``operations`` (the signed
requests behind them), ``merkle`` (hashes of the log's perfect subtrees, level >= 1),
``checkpoints`` (every signed tree head), ``nonces`` (replay protection), and the caches of
derived state, always rebuilt by appending entries: ``accounts`` (balance, reputation),
``credited`` (credited rectangles of client sessions), ``earned``, ``tickets``, ``redeemed``,
``paid`` (rectangles of client sessions a verifier was paid for checking), ``evidence`` (fraud
evidence and disputes in the log), ``serving`` (serving declarations, in force from ``since``
until ``until``), ``calibrations`` (published calibrations, in the wire form).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from corolla.errors import LedgerError

__all__ = ["CALIBRATION_QUERY", "SERVERS_QUERY", "connect", "create_schema"]

SERVERS_QUERY = (
    "SELECT DISTINCT node FROM serving WHERE model = ? AND profile = ? AND b0 <= ? AND b1 >= ? "
    "AND since < ? AND until >= ? ORDER BY node"
)
"""Nodes whose declarations cover ``[start, end)`` of a model under a profile, logged before a
time and not withdrawn before it: ``(model, profile, start, end, before, before)``."""
CALIBRATION_QUERY = (
    "SELECT seq, time, calibration FROM calibrations WHERE model = ? AND profile = ? "
    "AND time < ? ORDER BY seq DESC LIMIT 1"
)
"""The latest calibration of a model and profile published before a time."""

_TABLES: dict[str, tuple[dict[str, type], str | tuple[str, ...]]] = {
    "meta": ({"key": str, "value": bytes}, "key"),
    "operations": (
        {
            "op": int,
            "author": bytes,
            "nonce": bytes,
            "timestamp": int,
            "action": str,
            "body": bytes,
            "signature": bytes,
            "time": int,
        },
        "op",
    ),
    "entries": (
        {
            "seq": int,
            "kind": str,
            "account": bytes,
            "amount": int,
            "ref": bytes,
            "payload": bytes,
            "op": int,
            "op_digest": bytes,
            "author": bytes,
            "author_signature": bytes,
            "time": int,
            "leaf_hash": bytes,
        },
        "seq",
    ),
    "merkle": ({"level": int, "idx": int, "hash": bytes}, ("level", "idx")),
    "checkpoints": (
        {"tree_size": int, "root_hash": bytes, "timestamp": int, "signature": bytes},
        "tree_size",
    ),
    "nonces": ({"author": bytes, "nonce": bytes, "expires": int}, ("author", "nonce")),
    "accounts": (
        {
            "account": bytes,
            "name": str,
            "balance": int,
            "reputation": int,
            "slashed": int,
            "since": int,
        },
        "account",
    ),
    "credited": (
        {"client": bytes, "session": bytes, "b0": int, "b1": int, "t0": int, "t1": int, "seq": int},
        ("client", "session", "b0", "t0"),
    ),
    "earned": ({"node": bytes, "client": bytes, "session": bytes}, ("node", "client", "session")),
    "tickets": (
        {"digest": bytes, "client": bytes, "budget": int, "spent": int, "ticket": bytes},
        "digest",
    ),
    "redeemed": ({"request": bytes, "ticket": bytes, "seq": int}, "request"),
    "paid": (
        {
            "verifier": bytes,
            "client": bytes,
            "session": bytes,
            "b0": int,
            "b1": int,
            "t0": int,
            "t1": int,
            "seq": int,
        },
        ("verifier", "client", "session", "b0", "t0"),
    ),
    "evidence": ({"digest": bytes, "accused": bytes, "seq": int}, "digest"),
    "serving": (
        {
            "seq": int,
            "node": bytes,
            "model": bytes,
            "b0": int,
            "b1": int,
            "profile": str,
            "since": int,
            "until": int,
        },
        "seq",
    ),
    "calibrations": (
        {"seq": int, "model": bytes, "profile": str, "time": int, "calibration": bytes},
        "seq",
    ),
}
_INDEXES = [
    ("entries", ["account", "seq"], "entries_by_account"),
    ("entries", ["op"], "entries_by_op"),
    ("credited", ["client", "session", "t1"], "credited_by_end"),
    ("accounts", ["balance"], "accounts_by_balance"),
    ("accounts", ["reputation"], "accounts_by_reputation"),
    ("nonces", ["expires"], "nonces_by_expiry"),
    ("serving", ["model", "profile", "b0"], "serving_by_model"),
    ("serving", ["node", "model", "until"], "serving_by_node"),
    ("calibrations", ["model", "profile", "time"], "calibrations_by_model"),
]


def connect(path: str | Path, *, create: bool) -> sqlite3.Connection:
    """Open the database in WAL mode with durable commits (``synchronous=FULL``), in
    autocommit mode so that transactions are explicit (``BEGIN IMMEDIATE`` ... ``COMMIT``)."""
    path = Path(path)
    if not create and not path.exists():
        raise LedgerError(f"no ledger database at {path}")
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.Error as error:
        raise LedgerError(f"cannot open ledger database {path}: {error}") from None
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    """Create missing tables and indexes (strict tables, every column NOT NULL)."""
    db = sqlite_utils.Database(conn)
    for name, (columns, pk) in _TABLES.items():
        db[name].create(columns, pk=pk, not_null=set(columns), strict=True, if_not_exists=True)
    for table, columns, index_name in _INDEXES:
        db[table].create_index(columns, index_name=index_name, if_not_exists=True)
