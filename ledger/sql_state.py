"""The derived state in SQLite: what the ledger's writer reads and writes inside its one open
write transaction (the auditor keeps the same state in memory,
:class:`corolla.ledger.memory.MemoryState`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from corolla.ledger.api.checks import Serving, calibration_from_wire, calibration_to_wire
from corolla.ledger.api.envelope import Envelope
from corolla.ledger.api.models import Account, Draft
from corolla.ledger.config import LedgerRules
from corolla.ledger.entries import RawEntry, raw_leaf_hash
from corolla.ledger.reader import SqlTree
from corolla.ledger.rules import Rect
from corolla.ledger.schema import CALIBRATION_QUERY, SERVERS_QUERY
from corolla.ledger.state import NEVER, Effect, TicketState, admit
from corolla.verify.encoding import canonical, decode
from corolla.verify.fast import encode
from corolla.verify.identity import Identity
from corolla.verify.merkle import completed_subtrees, node_hash
from corolla.verify.tickets import Ticket

if TYPE_CHECKING:
    from corolla.verify.tolerance import Calibration

__all__ = ["SqlState", "Writer"]


class Writer(Protocol):
    """What the state needs of the ledger's writer (:class:`corolla.ledger.store.LedgerStore`)."""

    identity: Identity
    origin: str
    rules: LedgerRules

    @property
    def connection(self) -> Any: ...


class SqlState:
    """The derived state in SQLite, read and written inside the open write transaction; an
    entry is checked by :func:`~corolla.ledger.state.admit` (the invariants the auditor's
    :class:`~corolla.ledger.state.MemoryState` checks too) before it is written."""

    def __init__(
        self,
        store: Writer,
        operation: tuple[int, Envelope, int],
        next_seq: int,
    ) -> None:
        self.ledger_key = store.identity.public_key
        self.origin = store.origin
        self.rules = store.rules
        self._store = store
        self._conn = store.connection
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

    def paid(self, verifier: bytes, client: bytes, session: bytes, rect: Rect) -> list[Rect]:
        b0, b1, t0, t1 = rect
        return self._conn.execute(
            "SELECT b0, b1, t0, t1 FROM paid WHERE verifier = ? AND client = ? AND session = ? "
            "AND t1 > ? AND t0 < ? AND b0 < ? AND b1 > ?",
            (verifier, client, session, t0, t1, b1, b0),
        ).fetchall()

    def serves(self, node: bytes, serving: Serving) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM serving WHERE node = ? AND model = ? AND until = ? AND b0 = ? "
                "AND b1 = ? AND profile = ?",
                (node, serving.model_digest, NEVER, serving.start, serving.end, serving.profile),
            ).fetchone()
            is not None
        )

    def servers(self, serving: Serving, before: int) -> list[bytes]:
        rows = self._conn.execute(
            SERVERS_QUERY,
            (serving.model_digest, serving.profile, serving.start, serving.end, before, before),
        ).fetchall()
        return [row[0] for row in rows]

    def calibration(self, model: bytes, profile: str, before: int) -> Calibration | None:
        row = self._conn.execute(CALIBRATION_QUERY, (model, profile, before)).fetchone()
        return None if row is None else calibration_from_wire(decode(row[2]))

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
        if effect.paid is not None:
            client, session, pieces = effect.paid
            conn.executemany(
                "INSERT INTO paid VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(draft.account, client, session, *piece, seq) for piece in pieces],
            )
        if effect.evidence is not None:
            conn.execute(
                "INSERT INTO evidence VALUES (?, ?, ?)", (effect.evidence, draft.account, seq)
            )
        self._apply_checks(draft, effect, seq)

    def _apply_checks(self, draft: Draft, effect: Effect, seq: int) -> None:
        """The derived state of checks v2: declarations and calibrations."""
        conn = self._conn
        if effect.declared is not None:
            serving, since = effect.declared
            conn.execute(
                "INSERT INTO serving VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, draft.account, serving.model_digest, serving.start, serving.end,
                 serving.profile, since, NEVER),
            )  # fmt: skip
        if effect.withdrawn is not None:
            serving, until = effect.withdrawn
            conn.execute(
                "UPDATE serving SET until = ? WHERE node = ? AND model = ? AND until = ? "
                "AND b0 = ? AND b1 = ? AND profile = ?",
                (until, draft.account, serving.model_digest, NEVER, serving.start, serving.end,
                 serving.profile),
            )  # fmt: skip
        if effect.calibration is not None:
            calibration, time = effect.calibration
            conn.execute(
                "INSERT INTO calibrations VALUES (?, ?, ?, ?, ?)",
                (seq, calibration.model_digest, calibration.profile, time,
                 canonical(calibration_to_wire(calibration))),
            )  # fmt: skip
