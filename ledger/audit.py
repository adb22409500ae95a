"""The auditor: rebuild a ledger from its log alone and check every claim it makes.

Like a certificate-transparency monitor, :func:`audit` fetches every entry and the operation
behind it, then checks, failing on the first entry at fault (:class:`AuditFailed` names it):

1. the checkpoint's signature, pinned to the ledger's key (the genesis author, or the key
   remembered in the state file);
2. each entry: no gap in the sequence, and its recomputed leaf hash equals the ledger's;
3. the Merkle root of all recomputed leaves equals the signed checkpoint's root (when it does
   not, a binary search with the ledger's consistency proofs names the first bad entry);
4. consistency with the checkpoint remembered from the last audit (``state_file``): a ledger
   that rewrote history since then is caught here;
5. each operation: the author's signature, the body's digest, a fresh nonce, a timestamp inside
   the clock window; then replaying the operation under the log's own rules (genesis entry) on
   a fresh in-memory state re-verifies every receipt and request signature behind a credit or a
   redemption, and must produce exactly the logged entries, which enforces the invariants
   (no double credit, no negative balance, no ticket overspent, every credit backed by evidence);
6. the balances and reputations the ledger serves equal the recomputed ones.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corolla.errors import CorollaError, InvalidInput, VerificationError
from corolla.ledger.config import LedgerRules, ServiceLimits
from corolla.ledger.entries import Entry, Operation, parse_json
from corolla.ledger.operations import Prepared, apply, prepare
from corolla.ledger.rules import VerifiedStep
from corolla.ledger.sources import LogSource
from corolla.ledger.state import MemoryState
from corolla.ledger.tickets import Ticket, verify_ticket
from corolla.verify.checkpoints import Checkpoint, verify_checkpoint
from corolla.verify.identity import peer_name_of
from corolla.verify.merkle import MerkleTree, verify_consistency

__all__ = ["AuditFailed", "AuditReport", "audit"]

Progress = Callable[[str, int, int], None]
"""``(phase, done, total)``: called as the audit advances."""

# Service limits are policy, not rules: the auditor accepts whatever the ledger accepted.
_AUDIT_LIMITS = ServiceLimits(max_body_bytes=1 << 40, max_pairs=1 << 30)
_MAX_WORKERS = 8
_PARALLEL_BYTES = 2_000_000
"""Below this much work and redemption evidence, starting processes costs more than it saves."""


class AuditFailed(VerificationError):
    """The ledger failed an audit; ``seq`` is the first entry at fault (None: not one entry)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message if seq is None else f"entry {seq}: {message}")
        self.seq = seq


@dataclass(slots=True)
class AuditReport:
    """What a passing audit checked."""

    source: str
    origin: str
    ledger_key: bytes
    tree_size: int
    root_hash: bytes
    operations: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    pairs_verified: int = 0
    accounts: int = 0
    points: int = 0
    consistent_with: int | None = None
    cached_state_compared: bool = False


def audit(
    source: LogSource, state_file: Path | None = None, progress: Progress | None = None
) -> AuditReport:
    """Audit ``source``; raise :class:`AuditFailed` at the first fault, else report."""
    remembered = _load_state(state_file)
    pinned_key = None if remembered is None else bytes.fromhex(remembered["ledger_key"])
    try:
        checkpoint = source.checkpoint()
        verify_checkpoint(checkpoint, ledger_key=pinned_key)
    except VerificationError as error:
        raise AuditFailed(f"checkpoint: {error}") from None
    size = checkpoint.tree_size
    report = AuditReport(
        source.name, checkpoint.origin, checkpoint.ledger_key, size, checkpoint.root_hash
    )
    entries, operations, tree = _fetch(source, size, progress)
    _check_root(source, tree, checkpoint)
    if remembered is not None:
        report.consistent_with = _check_consistency(source, tree, checkpoint, remembered)
    state = _replay(entries, operations, checkpoint, report, progress)
    _compare_cached(source, state, entries, report)
    report.accounts = len(state.accounts)
    report.points = sum(account.balance for account in state.accounts.values())
    if state_file is not None:
        _save_state(state_file, checkpoint)
    return report


def _fetch(
    source: LogSource, size: int, progress: Progress | None
) -> tuple[list[Entry], dict[int, Operation], MerkleTree]:
    entries: list[Entry] = []
    operations: dict[int, Operation] = {}
    tree = MerkleTree()
    for page in source.pages(size):
        leaves = []
        for entry in page.entries:
            expected = len(entries)
            if entry.seq != expected:
                raise AuditFailed("missing from the log (deleted or renumbered)", expected)
            leaf = entry.leaf_hash()
            if page.leaf_hashes.get(entry.seq) != leaf:
                raise AuditFailed(
                    "its content does not hash to its leaf hash: the entry was modified",
                    entry.seq,
                )
            entries.append(entry)
            leaves.append(leaf)
        tree.extend(leaves)
        operations.update(page.operations)
        if progress is not None:
            progress("fetch", len(entries), size)
    if len(entries) != size:
        raise AuditFailed("missing: the log is shorter than its checkpoint", len(entries))
    return entries, operations, tree


def _check_root(source: LogSource, tree: MerkleTree, checkpoint: Checkpoint) -> None:
    if tree.root() == checkpoint.root_hash:
        return
    # Binary search for the shortest prefix of our leaves the ledger's tree disagrees with.
    good, bad = 0, tree.size
    while bad - good > 1:
        middle = (good + bad) // 2
        try:
            proof = source.consistency_proof(middle, tree.size)
            verify_consistency(middle, tree.size, tree.root(middle), checkpoint.root_hash, proof)
            good = middle
        except (VerificationError, CorollaError):
            bad = middle
    raise AuditFailed("the log's entries do not hash to the signed checkpoint's root", bad - 1)


def _check_consistency(
    source: LogSource, tree: MerkleTree, checkpoint: Checkpoint, remembered: dict[str, Any]
) -> int:
    old_size = int(remembered["tree_size"])
    old_root = bytes.fromhex(remembered["root_hash"])
    if remembered["origin"] != checkpoint.origin:
        raise AuditFailed(f"the log is {checkpoint.origin!r}, the state file is for another")
    if old_size > checkpoint.tree_size:
        raise AuditFailed(
            f"the log shrank from {old_size} to {checkpoint.tree_size} entries since the last "
            "audit: history was rewritten"
        )
    try:
        proof = source.consistency_proof(old_size, checkpoint.tree_size)
        verify_consistency(old_size, checkpoint.tree_size, old_root, checkpoint.root_hash, proof)
    except (VerificationError, CorollaError) as error:
        raise AuditFailed(
            f"not consistent with the checkpoint of size {old_size} seen at the last audit: "
            f"history was rewritten ({error})"
        ) from None
    if tree.root(old_size) != old_root:
        raise AuditFailed(
            f"the first {old_size} entries changed since the last audit: history was rewritten"
        )
    return old_size


def _replay(
    entries: list[Entry],
    operations: dict[int, Operation],
    checkpoint: Checkpoint,
    report: AuditReport,
    progress: Progress | None,
) -> MemoryState:
    if not entries or entries[0].kind != "genesis":
        raise AuditFailed("the log does not start with a genesis entry", 0)
    genesis = entries[0]
    if genesis.author != checkpoint.ledger_key:
        raise AuditFailed("the genesis entry is not the checkpoint signer's", 0)
    try:
        rules = LedgerRules.from_dict(genesis.payload.get("rules"))
    except (InvalidInput, AttributeError) as error:
        raise AuditFailed(f"the genesis entry holds no valid rules: {error}", 0) from None
    state = MemoryState(checkpoint.ledger_key, rules)
    verified = _verify_in_parallel(operations)
    nonces: set[tuple[bytes, bytes]] = set()
    last_op = -1
    for group in _groups(entries):
        first = group[0]
        operation = operations.get(first.op)
        if operation is None or first.op <= last_op:
            raise AuditFailed("the operation behind it is missing or out of order", first.seq)
        last_op = first.op
        _check_operation(group, operation, rules, nonces)
        prepared = verified.get(operation.op) or _prepare(operation, first.seq)
        if isinstance(prepared, str):
            raise AuditFailed(f"its operation does not verify: {prepared}", first.seq)
        report.pairs_verified += len(prepared.steps)
        for entry in group:
            if entry.kind == "ticket_bought":
                _take_ticket_signature(entry, state)
        replayed_from = len(state.drafts)
        try:
            apply(prepared, state, operation.time)
        except CorollaError as error:
            raise AuditFailed(f"its operation breaks the rules: {error}", first.seq) from None
        replayed = state.drafts[replayed_from:]
        for offset, entry in enumerate(group):
            draft = replayed[offset] if offset < len(replayed) else None
            if draft != entry.draft():
                raise AuditFailed(
                    "replaying its operation under the rules gives another entry "
                    f"({'nothing' if draft is None else draft.kind}): a wrong amount, a double "
                    "credit, or an entry without evidence",
                    entry.seq,
                )
        if len(replayed) > len(group):
            raise AuditFailed("its operation should have produced more entries", group[-1].seq)
        report.operations += 1
        report.kinds.update(entry.kind for entry in group)
        if progress is not None:
            progress("replay", group[-1].seq + 1, len(entries))
    return state


def _groups(entries: list[Entry]) -> Iterator[list[Entry]]:
    group: list[Entry] = []
    for entry in entries:
        if group and entry.op != group[0].op:
            yield group
            group = []
        group.append(entry)
    if group:
        yield group


def _check_operation(
    group: list[Entry],
    operation: Operation,
    rules: LedgerRules,
    nonces: set[tuple[bytes, bytes]],
) -> None:
    envelope = operation.envelope
    digest = envelope.digest()
    for entry in group:
        if (
            entry.op_digest != digest
            or entry.author != envelope.author
            or entry.author_signature != envelope.signature
            or entry.time != operation.time
        ):
            raise AuditFailed("it does not match the signed operation behind it", entry.seq)
    if (envelope.author, envelope.nonce) in nonces:
        raise AuditFailed("its operation replays an earlier request's nonce", group[0].seq)
    nonces.add((envelope.author, envelope.nonce))
    if abs(envelope.timestamp - operation.time) > rules.clock_window_s * 1000:
        raise AuditFailed("its request's timestamp is outside the clock window", group[0].seq)


def _prepare(operation: Operation, seq: int) -> Prepared:
    try:
        return prepare(operation.envelope, operation.value(), _AUDIT_LIMITS)
    except CorollaError as error:
        raise AuditFailed(f"its operation does not verify: {error}", seq) from None


def _verify_in_parallel(operations: dict[int, Operation]) -> dict[int, Prepared | str]:
    """Check the signatures of the big operations (work, redemptions) on every core at once:
    they are independent of each other and of the state. Small logs are checked in line."""
    heavy = [op for op in operations.values() if op.envelope.action in ("work", "redeem")]
    workers = min(os.cpu_count() or 1, _MAX_WORKERS)
    if workers < 2 or sum(len(op.body) for op in heavy) < _PARALLEL_BYTES:
        return {}
    # fork is quick and safe when this process runs no other thread; else start afresh.
    method = "fork" if threading.active_count() == 1 else "spawn"
    items = [(op.op, op.envelope, op.body) for op in heavy]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        results = pool.map(_prepare_steps, items, chunksize=max(1, len(items) // (8 * workers)))
        return {
            op: result if isinstance(result, str) else Prepared(envelope, None, result)
            for (op, envelope, _), result in zip(items, results, strict=True)
        }


def _prepare_steps(item: tuple[int, Any, bytes]) -> tuple[VerifiedStep, ...] | str:
    """In a worker process: the verified steps of one operation, or why it fails."""
    _, envelope, body = item
    try:
        return prepare(envelope, parse_json(body), _AUDIT_LIMITS).steps
    except CorollaError as error:
        return str(error)


def _take_ticket_signature(entry: Entry, state: MemoryState) -> None:
    try:
        ticket = Ticket.from_value(entry.payload["ticket"])
        verify_ticket(ticket, ledger_key=state.ledger_key)
    except (CorollaError, KeyError, TypeError) as error:
        raise AuditFailed(f"its ticket is not signed by the ledger: {error}", entry.seq) from None
    state.ticket_signatures[ticket.serial] = ticket.signature


def _compare_cached(
    source: LogSource, state: MemoryState, entries: list[Entry], report: AuditReport
) -> None:
    served = {account.key: account for account in source.accounts()}
    if source.checkpoint().tree_size != report.tree_size:
        return  # the ledger moved on while we audited: its caches are ahead of our replay
    last_entry: dict[bytes, int] = {entry.account: entry.seq for entry in entries}
    for key in served.keys() | state.accounts.keys():
        mine, theirs = state.accounts.get(key), served.get(key)
        if mine != theirs:
            raise AuditFailed(
                f"account {peer_name_of(key)}: the ledger serves {_show(theirs)}, its log gives "
                f"{_show(mine)}",
                last_entry.get(key),
            )
    report.cached_state_compared = True


def _show(account: object) -> str:
    if account is None:
        return "no account"
    return f"balance {account.balance}, reputation {account.reputation}"  # type: ignore[attr-defined]


def _load_state(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        for name in ("origin", "ledger_key", "tree_size", "root_hash"):
            if name not in data:
                raise ValueError(f"no {name}")
        return data
    except (OSError, ValueError) as error:
        raise InvalidInput(f"cannot read audit state file {path}: {error}") from None


def _save_state(path: Path, checkpoint: Checkpoint) -> None:
    data = {
        "origin": checkpoint.origin,
        "ledger_key": checkpoint.ledger_key.hex(),
        "tree_size": checkpoint.tree_size,
        "root_hash": checkpoint.root_hash.hex(),
        "checkpoint": checkpoint.to_dict(),
    }
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        temporary.replace(path)
    except OSError as error:
        raise InvalidInput(f"cannot write audit state file {path}: {error}") from None
