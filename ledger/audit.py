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
   a fresh in-memory state re-verifies every receipt signature behind a credit or a redemption
   and every attestation behind a credit (the verifier's signed verdict and recomputation, the
   beacon's signature, the assignment re-derived from the beacon, the node's chain and the
   serving declarations replayed so far, the verdict against the threshold of the calibrations
   replayed so far), re-checks every piece of fraud evidence and every dispute
   (``check_evidence``, ``check_dispute``: signatures, digests, tensors), and must produce
   exactly the logged entries, which enforces the invariants (no double credit, no negative
   balance, no ticket overspent, every credit backed by a passed check of an assigned verifier,
   every position a verifier checked paid once, every slash backed by evidence or a dispute,
   nothing earned after a slash). The ledger referee's convictions and judgments are taken as
   logged unless the auditor has the model (``referee``), in which case it recomputes them and
   must reach the same decision;
6. the balances, reputations and slashed marks the ledger serves equal the recomputed ones.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corolla.errors import CorollaError, InvalidInput, VerificationError
from corolla.ledger.api.models import Draft
from corolla.ledger.audit_checks import (
    Checked,
    LoggedJudge,
    LoggedReferee,
    OperationChecker,
    check_operation,
)
from corolla.ledger.config import LedgerRules
from corolla.ledger.entries import RawEntry, RawOperation, raw_leaf_hash
from corolla.ledger.memory import MemoryState
from corolla.ledger.operations import apply
from corolla.ledger.sources import LogSource
from corolla.verify.checkpoints import Checkpoint, verify_checkpoint
from corolla.verify.encoding import decode
from corolla.verify.fast import encode
from corolla.verify.identity import peer_name_of
from corolla.verify.merkle import MerkleTree, verify_consistency
from corolla.verify.referee import RefereeLike
from corolla.verify.tickets import Ticket, verify_ticket

__all__ = ["AuditFailed", "AuditReport", "audit"]

Progress = Callable[[str, int, int], None]
"""``(phase, done, total)``: called as the audit advances."""

_PARALLEL_ENTRIES = 20_000
"""Below this many entries, starting worker processes costs more than it saves."""


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
    attestations_verified: int = 0
    evidence_checked: int = 0
    disputes_checked: int = 0
    referee_recomputed: int = 0
    accounts: int = 0
    points: int = 0
    consistent_with: int | None = None
    cached_state_compared: bool = False


def audit(
    source: LogSource,
    state_file: Path | None = None,
    progress: Progress | None = None,
    referee: RefereeLike | None = None,
) -> AuditReport:
    """Audit ``source``; raise :class:`AuditFailed` at the first fault, else report. With
    ``referee`` (the model, :class:`~corolla.node.referee.Referee`), convictions by the
    ledger's referee are recomputed."""
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
    with OperationChecker(parallel=size >= _PARALLEL_ENTRIES) as checker:
        entries, operations, tree = _fetch(source, size, progress, checker)
        _check_root(source, tree, checkpoint)
        if remembered is not None:
            report.consistent_with = _check_consistency(source, tree, checkpoint, remembered)
        state = _replay(entries, operations, checkpoint, report, progress, referee, checker)
    _compare_cached(source, state, entries, report)
    report.accounts = len(state.accounts)
    report.points = sum(account.balance for account in state.accounts.values())
    if state_file is not None:
        _save_state(state_file, checkpoint)
    return report


def _fetch(
    source: LogSource, size: int, progress: Progress | None, checker: OperationChecker
) -> tuple[list[RawEntry], dict[int, RawOperation], MerkleTree]:
    """Read every entry, check its leaf hash, build the tree; hand the big operations to the
    checker as soon as they are read (it checks them while this goes on)."""
    entries: list[RawEntry] = []
    operations: dict[int, RawOperation] = {}
    tree = MerkleTree()
    for page in source.pages(size):
        leaves = []
        for entry, stored in zip(page.entries, page.leaf_hashes, strict=True):
            expected = len(entries)
            if entry[0] != expected:
                raise AuditFailed("missing from the log (deleted or renumbered)", expected)
            try:
                leaf = raw_leaf_hash(entry)
            except InvalidInput as error:
                raise AuditFailed(str(error), expected) from None
            if stored != leaf:
                raise AuditFailed(
                    "its content does not hash to its leaf hash: the entry was modified",
                    expected,
                )
            entries.append(entry)
            leaves.append(leaf)
        tree.extend(leaves)
        checker.submit(page.operations)
        for operation in page.operations:
            # A checked body is no longer needed here (a report's can be large).
            if checker.parallel and operation[4] in ("report", "redeem"):
                operation = (*operation[:5], b"", *operation[6:])  # type: ignore[assignment]
            operations.setdefault(operation[0], operation)
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
    entries: list[RawEntry],
    operations: dict[int, RawOperation],
    checkpoint: Checkpoint,
    report: AuditReport,
    progress: Progress | None,
    referee: RefereeLike | None,
    checker: OperationChecker,
) -> MemoryState:
    if not entries or entries[0][1] != "genesis":
        raise AuditFailed("the log does not start with a genesis entry", 0)
    genesis = entries[0]
    if genesis[8] != checkpoint.ledger_key:
        raise AuditFailed("the genesis entry is not the checkpoint signer's", 0)
    try:
        rules = LedgerRules.from_dict(decode(genesis[5]).get("rules"))
    except (InvalidInput, AttributeError) as error:
        raise AuditFailed(f"the genesis entry holds no valid rules: {error}", 0) from None
    state = MemoryState(checkpoint.ledger_key, rules, checkpoint.origin)
    nonces: set[tuple[bytes, bytes]] = set()
    last_op = -1
    for group in _groups(entries):
        first = group[0]
        operation = operations.get(first[6])
        if operation is None or first[6] <= last_op:
            raise AuditFailed("the operation behind it is missing or out of order", first[0])
        last_op = first[6]
        evidence = operation[4] in ("evidence", "dispute")
        logged: LoggedReferee | LoggedJudge | None = None
        if operation[4] == "evidence":
            logged = LoggedReferee.of(group, referee)
        elif operation[4] == "dispute":
            logged = LoggedJudge.of(group, referee)
        checked = checker.take(operation) or check_operation(operation, logged)
        _check_operation(group, operation, checked, rules, nonces)
        prepared = checked.prepared
        if isinstance(prepared, str):
            raise AuditFailed(f"its operation does not verify: {prepared}", first[0])
        report.pairs_verified += len(prepared.steps)
        report.attestations_verified += len(prepared.attestations)
        report.disputes_checked += operation[4] == "dispute"
        report.evidence_checked += evidence
        report.referee_recomputed += 0 if logged is None else logged.recomputed
        for entry in group:
            if entry[1] == "ticket_bought":
                _take_ticket_signature(entry, state)
        replayed_from = len(state.drafts)
        try:
            apply(prepared, state, operation[7])
        except CorollaError as error:
            raise AuditFailed(f"its operation breaks the rules: {error}", first[0]) from None
        replayed = state.drafts[replayed_from:]
        for offset, entry in enumerate(group):
            draft = replayed[offset] if offset < len(replayed) else None
            if not _same(draft, entry):
                raise AuditFailed(
                    "replaying its operation under the rules gives another entry "
                    f"({'nothing' if draft is None else draft.kind}): a wrong amount, a double "
                    "credit, or an entry without evidence",
                    entry[0],
                )
        if len(replayed) > len(group):
            raise AuditFailed("its operation should have produced more entries", group[-1][0])
        report.operations += 1
        report.kinds.update(entry[1] for entry in group)
        if progress is not None:
            progress("replay", group[-1][0] + 1, len(entries))
    return state


def _same(draft: Draft | None, entry: RawEntry) -> bool:
    """Whether a replayed draft is the logged entry (payloads compared as canonical bytes)."""
    return (
        draft is not None
        and draft.kind == entry[1]
        and draft.account == entry[2]
        and draft.amount == entry[3]
        and draft.ref == entry[4]
        and encode(draft.payload) == entry[5]
    )


def _groups(entries: list[RawEntry]) -> Iterator[list[RawEntry]]:
    group: list[RawEntry] = []
    for entry in entries:
        if group and entry[6] != group[0][6]:
            yield group
            group = []
        group.append(entry)
    if group:
        yield group


def _check_operation(
    group: list[RawEntry],
    operation: RawOperation,
    checked: Checked,
    rules: LedgerRules,
    nonces: set[tuple[bytes, bytes]],
) -> None:
    envelope = checked.envelope
    if envelope is None:
        raise AuditFailed(f"its operation does not verify: {checked.prepared}", group[0][0])
    digest = envelope.digest()
    time = operation[7]
    for entry in group:
        if (
            entry[7] != digest
            or entry[8] != envelope.author
            or entry[9] != envelope.signature
            or entry[10] != time
        ):
            raise AuditFailed("it does not match the signed operation behind it", entry[0])
    if (envelope.author, envelope.nonce) in nonces:
        raise AuditFailed("its operation replays an earlier request's nonce", group[0][0])
    nonces.add((envelope.author, envelope.nonce))
    if abs(envelope.timestamp - time) > rules.clock_window_s * 1000:
        raise AuditFailed("its request's timestamp is outside the clock window", group[0][0])


def _take_ticket_signature(entry: RawEntry, state: MemoryState) -> None:
    try:
        ticket = Ticket.from_value(decode(entry[5])["ticket"])
        verify_ticket(ticket, ledger_key=state.ledger_key)
    except (CorollaError, KeyError, TypeError) as error:
        raise AuditFailed(f"its ticket is not signed by the ledger: {error}", entry[0]) from None
    state.ticket_signatures[ticket.serial] = ticket.signature


def _compare_cached(
    source: LogSource, state: MemoryState, entries: list[RawEntry], report: AuditReport
) -> None:
    served = {account.key: account for account in source.accounts()}
    if source.checkpoint().tree_size != report.tree_size:
        return  # the ledger moved on while we audited: its caches are ahead of our replay
    last_entry: dict[bytes, int] = {entry[2]: entry[0] for entry in entries}
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
    slashed = ", slashed" if account.slashed else ""  # type: ignore[attr-defined]
    return f"balance {account.balance}, reputation {account.reputation}{slashed}"  # type: ignore[attr-defined]


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
