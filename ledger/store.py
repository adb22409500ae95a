"""The ledger's writer: one signed operation, one SQLite write transaction.

:meth:`LedgerStore.submit` checks the request outside the write lock (signatures are the slow
part, and PyNaCl releases the GIL), then, holding the one writer connection, opens ``BEGIN
IMMEDIATE``, records the nonce (a replay finds it and is refused), applies the operation's
rules against :class:`SqlState`, appends its entries with their Merkle nodes and cached effects,
signs a new checkpoint, and commits with ``synchronous=FULL``: an acknowledged operation is on
disk whole, and a crash leaves none of a half-applied one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from corolla.errors import LedgerError, LedgerRefused
from corolla.ledger.api.envelope import Envelope, body_digest, now_ms, sign_envelope
from corolla.ledger.api.models import Account, Draft
from corolla.ledger.config import LedgerRules, ServiceLimits
from corolla.ledger.entries import RawEntry, raw_leaf_hash, stored_json
from corolla.ledger.operations import Outcome, Prepared, apply, prepare
from corolla.ledger.reader import LedgerReader, SqlTree
from corolla.ledger.rules import Rect
from corolla.ledger.schema import connect, create_schema
from corolla.ledger.state import Effect, TicketState, admit
from corolla.verify.checkpoints import Checkpoint, sign_checkpoint
from corolla.verify.encoding import canonical, decode
from corolla.verify.fast import encode
from corolla.verify.identity import Identity, peer_name_of
from corolla.verify.merkle import completed_subtrees, node_hash, root_from_perfect
from corolla.verify.referee import RefereeLike
from corolla.verify.tickets import Ticket

__all__ = ["DEFAULT_ORIGIN", "LedgerStore", "SqlState"]

DEFAULT_ORIGIN = "corolla-ledger"
_NONCE_PRUNE_EVERY = 256


class SqlState:
    """The derived state in SQLite, read and written inside the open write transaction; an
    entry is checked by :func:`~corolla.ledger.state.admit` (the invariants the auditor's
    :class:`~corolla.ledger.state.MemoryState` checks too) before it is written."""

    def __init__(
        self,
        store: LedgerStore,
        operation: tuple[int, Envelope, int],
        next_seq: int,
    ) -> None:
        self.ledger_key = store.identity.public_key
        self.rules = store.rules
        self._store = store
        self._conn = store._conn
        self._op, envelope, self._time = operation
        self._op_digest = envelope.digest()
        self._author = envelope.author
        self._signature = envelope.signature
        self.next_seq = next_seq
        self._tree = SqlTree(self._conn)

    def account(self, key: bytes) -> Account | None:
        row = self._conn.execute(
            "SELECT account, name, balance, reputation, slashed FROM accounts WHERE account = ?",
            (key,),
        ).fetchone()
        return None if row is None else Account(*row[:4], bool(row[4]))

    def covered(self, client: bytes, session: bytes, rect: Rect) -> list[Rect]:
        b0, b1, t0, t1 = rect
        return self._conn.execute(
            "SELECT b0, b1, t0, t1 FROM credited WHERE client = ? AND session = ? AND t1 > ? "
            "AND t0 < ? AND b0 < ? AND b1 > ?",
            (client, session, t0, t1, b1, b0),
        ).fetchall()

    def has_earned(self, node: bytes, client: bytes, session: bytes) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM earned WHERE node = ? AND client = ? AND session = ?",
                (node, client, session),
            ).fetchone()
            is not None
        )

    def ticket(self, digest: bytes) -> TicketState | None:
        row = self._conn.execute(
            "SELECT ticket, spent FROM tickets WHERE digest = ?", (digest,)
        ).fetchone()
        return None if row is None else TicketState(Ticket.from_value(decode(row[0])), row[1])

    def is_redeemed(self, request_digest: bytes) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM redeemed WHERE request = ?", (request_digest,)
            ).fetchone()
            is not None
        )

    def fee_paid(self, recomputation: bytes) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM fees WHERE recomputation = ?", (recomputation,)
            ).fetchone()
            is not None
        )

    def evidence(self, digest: bytes) -> int | None:
        row = self._conn.execute("SELECT seq FROM evidence WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else int(row[0])

    def sign_ticket(self, unsigned: Ticket) -> Ticket:
        signed = self._store.identity.sign(unsigned.signing_bytes())
        return Ticket(**{**unsigned.to_value(), "signature": signed})

    def append(self, draft: Draft) -> int:
        effect = admit(self, draft)  # refused before anything is written
        seq = self.next_seq
        entry: RawEntry = (
            seq,
            draft.kind,
            draft.account,
            draft.amount,
            draft.ref,
            encode(draft.payload),
            self._op,
            self._op_digest,
            self._author,
            self._signature,
            self._time,
        )
        leaf = raw_leaf_hash(entry)
        conn = self._conn
        conn.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*entry, leaf)
        )
        right = leaf
        for level, index in completed_subtrees(seq):
            right = node_hash(self._tree.perfect(level - 1, 2 * index), right)
            conn.execute("INSERT INTO merkle VALUES (?, ?, ?)", (level, index, right))
        self._apply(draft, effect, seq)
        self.next_seq = seq + 1
        return seq

    def _apply(self, draft: Draft, effect: Effect, seq: int) -> None:
        conn = self._conn
        if effect.register_name is not None:
            conn.execute(
                "INSERT INTO accounts VALUES (?, ?, 0, 0, 0, ?)",
                (draft.account, effect.register_name, seq),
            )
        elif effect.balance or effect.reputation or effect.slashed:
            conn.execute(
                "UPDATE accounts SET balance = balance + ?, reputation = reputation + ?, "
                "slashed = MAX(slashed, ?) WHERE account = ?",
                (effect.balance, effect.reputation, int(effect.slashed), draft.account),
            )
        if effect.session is not None:
            client, session = effect.session
            conn.executemany(
                "INSERT INTO credited VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(client, session, *piece, seq) for piece in effect.pieces],
            )
            conn.execute(
                "INSERT INTO earned VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (draft.account, client, session),
            )
        if effect.ticket is not None:
            ticket = effect.ticket
            conn.execute(
                "INSERT INTO tickets VALUES (?, ?, ?, 0, ?)",
                (ticket.digest(), ticket.client_key, ticket.budget, canonical(ticket.to_value())),
            )
        if effect.redeem is not None:
            ticket_digest, units = effect.redeem
            conn.execute(
                "UPDATE tickets SET spent = spent + ? WHERE digest = ?", (units, ticket_digest)
            )
            conn.execute("INSERT INTO redeemed VALUES (?, ?, ?)", (draft.ref, ticket_digest, seq))
        if effect.fee is not None:
            conn.execute("INSERT INTO fees VALUES (?, ?, ?)", (effect.fee, draft.account, seq))
        if effect.evidence is not None:
            conn.execute(
                "INSERT INTO evidence VALUES (?, ?, ?)", (effect.evidence, draft.account, seq)
            )


class LedgerStore:
    """The ledger database, owned by the ledger's identity (one writer per database)."""

    def __init__(
        self,
        path: str | Path,
        identity: Identity,
        *,
        origin: str = DEFAULT_ORIGIN,
        rules: LedgerRules | None = None,
        limits: ServiceLimits | None = None,
        clock: Callable[[], int] = now_ms,
        referee: RefereeLike | None = None,
        seed_verifiers: Sequence[bytes] = (),
    ) -> None:
        self.path = Path(path)
        self.identity = identity
        self.limits = limits or ServiceLimits()
        self.referee = referee
        """Judges fraud evidence by recomputing it, when the operator runs one."""
        self.clock = clock
        self._lock = threading.Lock()
        self._conn = connect(self.path, create=True)
        self._reader = LedgerReader(self._conn)
        self._writes = 0
        create_schema(self._conn)
        stored_key = self._reader.meta("ledger_key")
        if stored_key is None:
            self.origin = origin
            self.rules = rules or LedgerRules()
            self._start_log(seed_verifiers)
        else:
            if stored_key != identity.public_key:
                raise LedgerError(
                    f"{self.path} belongs to ledger key {peer_name_of(stored_key)}, "
                    f"not to {identity.peer_name}: start it with that key file"
                )
            genesis = self._reader.entries(0, 1)
            if not genesis or genesis[0].kind != "genesis":
                raise LedgerError(f"{self.path} has no genesis entry")
            self.origin = (self._reader.meta("origin") or b"").decode()
            self.rules = LedgerRules.from_dict(genesis[0].payload["rules"])

    def close(self) -> None:
        """Close the writer connection."""
        with self._lock:
            self._conn.close()

    def submit(self, envelope: Envelope, body: Any, *, time: int | None = None) -> dict[str, Any]:
        """Apply one signed operation (``body``: the parsed JSON value) and return what it did.

        Raises :class:`LedgerRefused` (replay, stale timestamp, a refusal by the rules),
        :class:`InvalidInput` or :class:`~corolla.errors.VerificationError`; then nothing was
        written."""
        return self.submit_encoded(envelope, body, canonical(body), time=time)

    def submit_encoded(
        self, envelope: Envelope, body: Any, data: bytes, *, time: int | None = None
    ) -> dict[str, Any]:
        """:meth:`submit` for a caller that already encoded the body (``data`` must be
        ``canonical(body)``: the HTTP layer computed it to rebuild the envelope)."""
        now = self.clock() if time is None else time
        window = self.rules.clock_window_s * 1000
        if abs(envelope.timestamp - now) > window:
            raise LedgerRefused(
                f"request timestamp is {(envelope.timestamp - now) / 1000:+.0f} s from the "
                f"ledger's clock (allowed: ±{self.rules.clock_window_s} s); check your clock",
                401,
            )
        if body_digest(data) != envelope.body_digest:
            raise LedgerRefused("the body is not the one the request's signature covers", 401)
        prepared = prepare(envelope, body, self.limits, self.referee)
        return self._commit(prepared, stored_json(body), now)

    def _commit(
        self, prepared: Prepared, body: bytes, now: int, meta: dict[str, bytes] | None = None
    ) -> dict[str, Any]:
        envelope = prepared.envelope
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for key, value in (meta or {}).items():
                    conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
                fresh = conn.execute(
                    "INSERT INTO nonces VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (
                        envelope.author,
                        envelope.nonce,
                        envelope.timestamp + 2 * 1000 * self.rules.clock_window_s,
                    ),
                ).rowcount
                if not fresh:
                    raise LedgerRefused("replayed request: this nonce was already used", 409)
                op = conn.execute(
                    "INSERT INTO operations (author, nonce, timestamp, action, body, signature, "
                    "time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        envelope.author,
                        envelope.nonce,
                        envelope.timestamp,
                        envelope.action,
                        body,
                        envelope.signature,
                        now,
                    ),
                ).lastrowid
                if op is None:
                    raise LedgerError("the database did not number the operation")
                state = SqlState(self, (op, envelope, now), self._reader.size())
                outcome = apply(prepared, state, now)
                if not outcome.seqs:
                    conn.execute("DELETE FROM operations WHERE op = ?", (op,))
                checkpoint = self._sign_checkpoint(state.next_seq, now) if outcome.seqs else None
                self._prune_nonces(now)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return _result(outcome, checkpoint)

    def _sign_checkpoint(self, size: int, now: int) -> Checkpoint:
        root = root_from_perfect(SqlTree(self._conn), size)
        checkpoint = sign_checkpoint(self.identity, self.origin, size, root, now)
        self._conn.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
            (size, root, now, checkpoint.signature),
        )
        return checkpoint

    def _prune_nonces(self, now: int) -> None:
        self._writes += 1
        if self._writes % _NONCE_PRUNE_EVERY == 0:
            self._conn.execute("DELETE FROM nonces WHERE expires < ?", (now,))

    def _start_log(self, seed_verifiers: Sequence[bytes]) -> None:
        """Write the meta rows and the genesis entry (the rules and the seed verifiers, signed
        by the ledger)."""
        body = {
            "origin": self.origin,
            "rules": self.rules.to_dict(),
            "seed_verifiers": [key.hex() for key in seed_verifiers],
        }
        now = self.clock()
        envelope = sign_envelope(self.identity, "genesis", canonical(body), timestamp=now)
        meta = {"ledger_key": self.identity.public_key, "origin": self.origin.encode()}
        self._commit(prepare(envelope, body, self.limits), stored_json(body), now, meta)


def _result(outcome: Outcome, checkpoint: Checkpoint | None) -> dict[str, Any]:
    result: dict[str, Any] = {"entries": outcome.seqs, **outcome.extra}
    if outcome.pairs:
        result["pairs"] = outcome.pairs
    if checkpoint is not None:
        result["checkpoint"] = checkpoint.to_dict()
    return result
