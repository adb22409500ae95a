"""Read-only queries on a ledger database: the log, its tree, accounts, checkpoints, proofs.

Used by the HTTP service (one connection per worker thread) and by ``corolla ledger audit
--db``. Every method that reads more than one table does it in one read transaction, so it sees
one consistent snapshot while the writer goes on (WAL).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corolla.errors import InvalidInput, LedgerError
from corolla.ledger.api.checks import Serving
from corolla.ledger.api.envelope import Envelope, body_digest
from corolla.ledger.api.models import Account, Entry, Operation, b64encode, parse_json
from corolla.ledger.schema import SERVERS_QUERY, connect
from corolla.verify.checkpoints import Checkpoint
from corolla.verify.encoding import canonical, decode
from corolla.verify.merkle import consistency_proof, inclusion_proof, root_from_perfect
from corolla.verify.tickets import Ticket

__all__ = ["LedgerReader", "SqlTree", "entry_from_row"]

_ENTRY_COLUMNS = (
    "seq, kind, account, amount, ref, payload, op, op_digest, author, author_signature, time"
)
_ACCOUNT_COLUMNS = "account, name, balance, reputation, slashed"


class SqlTree:
    """The log's Merkle tree as stored: leaves in ``entries``, perfect subtrees in ``merkle``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def perfect(self, level: int, index: int) -> bytes:
        if level == 0:
            row = self._conn.execute(
                "SELECT leaf_hash FROM entries WHERE seq = ?", (index,)
            ).fetchone()
        else:
            row = self._conn.execute(
                "SELECT hash FROM merkle WHERE level = ? AND idx = ?", (level, index)
            ).fetchone()
        if row is None:
            raise LedgerError(f"the ledger's tree has no node at level {level}, index {index}")
        return row[0]


def _account(row: tuple[Any, ...]) -> Account:
    key, name, balance, reputation, slashed = row
    return Account(key, name, balance, reputation, bool(slashed))


def entry_from_row(row: tuple[Any, ...]) -> Entry:
    """An :class:`Entry` from a row of ``_ENTRY_COLUMNS``."""
    seq, kind, account, amount, ref, payload, op, op_digest, author, signature, time = row
    return Entry(
        seq=seq,
        kind=kind,
        account=account,
        amount=amount,
        ref=ref,
        payload=decode(payload),
        op=op,
        op_digest=op_digest,
        author=author,
        author_signature=signature,
        time=time,
    )


class LedgerReader:
    """Queries on one connection (not shared between threads)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: str | Path) -> LedgerReader:
        """Open an existing ledger database for reading."""
        return cls(connect(path, create=False))

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every query inside sees the same state of the database."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def meta(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def size(self) -> int:
        """Number of entries (the tree size)."""
        row = self.conn.execute("SELECT MAX(seq) FROM entries").fetchone()
        return 0 if row[0] is None else row[0] + 1

    def last_time(self) -> int:
        """The time (ms) of the last operation in the log (0 for an empty log)."""
        row = self.conn.execute("SELECT time FROM operations ORDER BY op DESC LIMIT 1").fetchone()
        return 0 if row is None else int(row[0])

    def entries(self, start: int, limit: int) -> list[Entry]:
        """Entries ``start, start + 1, ...`` (at most ``limit``)."""
        rows = self.conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq >= ? ORDER BY seq LIMIT ?",
            (start, limit),
        ).fetchall()
        return [entry_from_row(row) for row in rows]

    def page(self, start: int, limit: int) -> dict[str, Any]:
        """A page of the log in its JSON form (``Entry.to_dict()`` plus the stored leaf hash,
        ``Operation.to_dict()``), straight from the rows: nothing is decoded or re-encoded."""
        with self.snapshot():
            rows = self.conn.execute(
                f"SELECT {_ENTRY_COLUMNS}, leaf_hash FROM entries WHERE seq >= ? "
                "ORDER BY seq LIMIT ?",
                (start, limit),
            ).fetchall()
            ops = sorted({row[6] for row in rows})
            operations = [
                self.conn.execute(
                    "SELECT op, author, nonce, timestamp, action, body, signature, time "
                    "FROM operations WHERE op = ?",
                    (op,),
                ).fetchone()
                for op in ops
            ]
        entries = [
            {
                "seq": seq,
                "kind": kind,
                "account": account.hex(),
                "amount": amount,
                "ref": ref.hex(),
                "payload": b64encode(payload),
                "op": op,
                "op_digest": op_digest.hex(),
                "author": author.hex(),
                "author_signature": signature.hex(),
                "time": time,
                "leaf_hash": leaf.hex(),
            }
            for (
                seq,
                kind,
                account,
                amount,
                ref,
                payload,
                op,
                op_digest,
                author,
                signature,
                time,
                leaf,
            ) in rows
        ]
        return {
            "entries": entries,
            "operations": [
                {
                    "op": op,
                    "author": author.hex(),
                    "nonce": nonce.hex(),
                    "timestamp": timestamp,
                    "action": action,
                    "signature": signature.hex(),
                    "body": body.decode("utf-8", errors="replace"),
                    "time": time,
                }
                for op, author, nonce, timestamp, action, body, signature, time in filter(
                    None, operations
                )
            ],
        }

    def raw_entries(self, start: int, limit: int) -> list[tuple[Any, ...]]:
        """Stored rows (``RawEntry`` and the leaf hash), payloads undecoded."""
        return self.conn.execute(
            f"SELECT {_ENTRY_COLUMNS}, leaf_hash FROM entries WHERE seq >= ? ORDER BY seq LIMIT ?",
            (start, limit),
        ).fetchall()

    def raw_operations(self, first: int, last: int) -> list[tuple[Any, ...]]:
        """Stored operations ``first .. last`` (``RawOperation``)."""
        return self.conn.execute(
            "SELECT op, author, nonce, timestamp, action, body, signature, time FROM operations "
            "WHERE op BETWEEN ? AND ? ORDER BY op",
            (first, last),
        ).fetchall()

    def leaf_hashes(self, start: int, limit: int) -> list[tuple[int, bytes]]:
        """Stored ``(seq, leaf hash)`` pairs."""
        return self.conn.execute(
            "SELECT seq, leaf_hash FROM entries WHERE seq >= ? ORDER BY seq LIMIT ?",
            (start, limit),
        ).fetchall()

    def operations(self, ops: set[int]) -> dict[int, Operation]:
        """The operations with these ids."""
        result = {}
        for op in sorted(ops):
            row = self.conn.execute(
                "SELECT op, author, nonce, timestamp, action, body, signature, time "
                "FROM operations WHERE op = ?",
                (op,),
            ).fetchone()
            if row is None:
                continue
            op_id, author, nonce, timestamp, action, body, signature, time = row
            try:
                digest = body_digest(canonical(parse_json(body)))
                envelope = Envelope(author, nonce, timestamp, action, digest, signature)
            except InvalidInput:
                continue
            result[op_id] = Operation(op_id, envelope, body, time)
        return result

    def history(self, account: bytes, before: int | None, limit: int) -> list[Entry]:
        """The account's entries, newest first, with ``seq < before`` when given."""
        bound = (1 << 62) if before is None else before
        rows = self.conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE account = ? AND seq < ? "
            "ORDER BY seq DESC LIMIT ?",
            (account, bound, limit),
        ).fetchall()
        return [entry_from_row(row) for row in rows]

    def account(self, key: bytes) -> Account | None:
        row = self.conn.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account = ?", (key,)
        ).fetchone()
        return None if row is None else _account(row)

    def accounts(self, after: bytes, limit: int) -> list[Account]:
        """All accounts in key order, from the first key greater than ``after``."""
        rows = self.conn.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account > ? ORDER BY account LIMIT ?",
            (after, limit),
        ).fetchall()
        return [_account(row) for row in rows]

    def top(self, by: str, limit: int) -> list[Account]:
        """The leaderboard by ``balance`` or ``reputation``."""
        if by not in ("balance", "reputation"):
            raise InvalidInput("rank by balance or reputation")
        other = "reputation" if by == "balance" else "balance"
        rows = self.conn.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts "
            f"ORDER BY {by} DESC, {other} DESC, account LIMIT ?",
            (limit,),
        ).fetchall()
        return [_account(row) for row in rows]

    def ticket(self, digest: bytes) -> tuple[Ticket, int] | None:
        """A sold ticket and the block-tokens redeemed from it."""
        row = self.conn.execute(
            "SELECT ticket, spent FROM tickets WHERE digest = ?", (digest,)
        ).fetchone()
        return None if row is None else (Ticket.from_value(decode(row[0])), row[1])

    def servers(self, serving: Serving, before: int) -> list[bytes]:
        """Keys of the nodes whose declarations cover ``serving``'s blocks of its model under its
        profile, logged before ``before`` (ms) and not withdrawn before then."""
        rows = self.conn.execute(
            SERVERS_QUERY,
            (serving.model_digest, serving.profile, serving.start, serving.end, before, before),
        ).fetchall()
        return [row[0] for row in rows]

    def calibrations(self, model: bytes) -> list[tuple[int, int, Any]]:
        """The latest published calibration of each profile of ``model``: ``(seq, time, wire
        form)``, by profile name."""
        rows = self.conn.execute(
            "SELECT seq, time, calibration FROM calibrations WHERE seq IN (SELECT MAX(seq) FROM "
            "calibrations WHERE model = ? GROUP BY profile) ORDER BY profile",
            (model,),
        ).fetchall()
        return [(seq, time, decode(data)) for seq, time, data in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        """The last checkpoint the ledger signed."""
        origin, key = self.meta("origin"), self.meta("ledger_key")
        row = self.conn.execute(
            "SELECT tree_size, root_hash, timestamp, signature FROM checkpoints "
            "ORDER BY tree_size DESC LIMIT 1"
        ).fetchone()
        if row is None or origin is None or key is None:
            return None
        size, root, timestamp, signature = row
        return Checkpoint(origin.decode(), size, root, timestamp, key, signature)

    def inclusion_proof(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """The leaf hash at ``index`` and its audit path in the tree of ``size`` entries."""
        with self.snapshot():
            self._check_size(size)
            tree = SqlTree(self.conn)
            proof = inclusion_proof(tree, index, size)
            return tree.perfect(0, index), proof

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """Proof that the tree of ``first`` entries is a prefix of the tree of ``second``."""
        with self.snapshot():
            self._check_size(second)
            return consistency_proof(SqlTree(self.conn), first, second)

    def root(self, size: int) -> bytes:
        """The stored tree's root at ``size``."""
        with self.snapshot():
            self._check_size(size)
            return root_from_perfect(SqlTree(self.conn), size)

    def _check_size(self, size: int) -> None:
        if size > self.size():
            raise InvalidInput(f"the log has {self.size()} entries, not {size}")
