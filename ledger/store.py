"""The ledger's writer: one signed operation, one SQLite write transaction.

:meth:`LedgerStore.submit` checks the request outside the write lock (signatures are the slow
part, and PyNaCl releases the GIL), then, holding the one writer connection, opens ``BEGIN
IMMEDIATE``, records the nonce (a replay finds it and is refused), applies the operation's
rules against :class:`~corolla.ledger.sql_state.SqlState`, appends its entries with their Merkle
nodes and cached effects, signs a new checkpoint, and commits with ``synchronous=FULL``: an
acknowledged operation is on disk whole, and a crash leaves none of a half-applied one.

An operation's time is read inside the write lock and never goes back (at least the previous
operation's), so the log's times follow its order: "logged before epoch e began" (what the
assignment of a check reads) is the same question for the ledger and for every auditor.

The store also signs the per-epoch beacon (:meth:`LedgerStore.beacon`), revealed only once its
epoch has begun.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from corolla.errors import LedgerError, LedgerRefused
from corolla.ledger.api.envelope import Envelope, body_digest, now_ms, sign_envelope
from corolla.ledger.config import LedgerRules, ServiceLimits
from corolla.ledger.entries import stored_json
from corolla.ledger.operations import Outcome, Prepared, apply, prepare
from corolla.ledger.reader import LedgerReader, SqlTree
from corolla.ledger.schema import connect, create_schema
from corolla.ledger.sql_state import SqlState
from corolla.verify.beacon import Beacon, epoch_of, epoch_start, sign_beacon
from corolla.verify.checkpoints import Checkpoint, sign_checkpoint
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity, peer_name_of
from corolla.verify.merkle import root_from_perfect
from corolla.verify.referee import RefereeLike

__all__ = ["DEFAULT_ORIGIN", "LedgerStore"]

DEFAULT_ORIGIN = "corolla-ledger"
_NONCE_PRUNE_EVERY = 256


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

    @property
    def connection(self) -> Any:
        """The writer's connection (used by the state inside the write transaction)."""
        return self._conn

    def current_epoch(self) -> int:
        """The beacon epoch the ledger's clock is in."""
        return epoch_of(self.clock() / 1000, self.rules.beacon_period_s)

    def beacon(self, epoch: int | None = None) -> Beacon:
        """The ledger's signed beacon of ``epoch`` (default: the current one); refuses (425) an
        epoch that has not begun: its value must stay unknown until then."""
        period = self.rules.beacon_period_s
        current = self.current_epoch()
        if epoch is None:
            epoch = current
        if epoch > current:
            wait = epoch_start(epoch, period) - self.clock() / 1000
            raise LedgerRefused(
                f"beacon epoch {epoch} has not begun (it begins in {wait:.1f} s; the current "
                f"epoch is {current})",
                425,
            )
        return sign_beacon(self.identity, self.origin, period, epoch)

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
        return self._commit(prepared, stored_json(body), now, fixed=time is not None)

    def _commit(
        self,
        prepared: Prepared,
        body: bytes,
        now: int,
        meta: dict[str, bytes] | None = None,
        *,
        fixed: bool = False,
    ) -> dict[str, Any]:
        envelope = prepared.envelope
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not fixed:
                    now = max(now, self.clock())
                now = max(now, self._reader.last_time())
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
