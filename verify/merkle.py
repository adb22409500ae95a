"""RFC 6962 Merkle tree hashing, proofs and their verification: pure functions over hashes.

The tree is Certificate Transparency's (RFC 6962 section 2.1, as restated in RFC 9162)::

    MTH({})      = SHA-256()
    leaf hash    = SHA-256(0x00 || entry bytes)
    MTH(D[0:n])  = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   k: largest power of 2 < n

Every node the recursion visits is either a *perfect* subtree (``2**level`` leaves starting at a
multiple of ``2**level``) or lies on the right edge of the tree and is rebuilt from perfect ones
in ``O(log n)``. So a log only needs to keep the perfect subtrees (:class:`SubtreeSource`): each
append completes amortised one of them, and roots and proofs for any size cost ``O(log n)``
lookups. :class:`MerkleTree` is the in-memory source an auditor builds from scratch.

Verification (:func:`verify_inclusion`, :func:`verify_consistency`) follows RFC 9162's
algorithms and raises :class:`~corolla.errors.VerificationError` with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from corolla.errors import InvalidInput, VerificationError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "SubtreeSource",
    "completed_subtrees",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_perfect",
    "root_hash",
    "subtree_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry): the hash of one log entry's bytes."""
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


class SubtreeSource(Protocol):
    """Where the hashes of perfect subtrees come from (a database, or :class:`MerkleTree`)."""

    def perfect(self, level: int, index: int) -> bytes:
        """Hash of the subtree over leaves ``[index * 2**level, (index + 1) * 2**level)``."""
        ...


def completed_subtrees(leaf_index: int) -> list[tuple[int, int]]:
    """The perfect subtrees ``(level, index)``, level >= 1, that appending leaf ``leaf_index``
    completes, lowest first. Each one's children are ``(level - 1, 2 * index)`` and
    ``(level - 1, 2 * index + 1)``; on average an append completes one."""
    _check_size("leaf index", leaf_index)
    completed = []
    count = leaf_index + 1
    level = 1
    while count % (1 << level) == 0:
        completed.append((level, (count >> level) - 1))
        level += 1
    return completed


def subtree_hash(source: SubtreeSource, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range the RFC 6962 recursion visits (start is a multiple of the
    largest power of 2 not above ``end - start``), from perfect subtrees only."""
    size = end - start
    if size <= 0:
        raise InvalidInput(f"empty or reversed range [{start}, {end})")
    if size & (size - 1) == 0:
        if start % size:
            raise InvalidInput(f"range [{start}, {end}) is not an aligned subtree")
        return source.perfect(size.bit_length() - 1, start // size)
    split = _largest_power_below(size)
    if start % split:
        raise InvalidInput(f"range [{start}, {end}) is not a subtree of an RFC 6962 tree")
    return node_hash(
        source.perfect(split.bit_length() - 1, start // split),
        subtree_hash(source, start + split, end),
    )


def root_from_perfect(source: SubtreeSource, size: int) -> bytes:
    """MTH of the first ``size`` leaves: :data:`EMPTY_ROOT` for 0, else :func:`subtree_hash`."""
    _check_size("tree size", size)
    if size == 0:
        return EMPTY_ROOT
    return subtree_hash(source, 0, size)


def inclusion_proof(source: SubtreeSource, index: int, size: int) -> list[bytes]:
    """RFC 6962 PATH(index, D[0:size]): the audit path of leaf ``index``, bottom first."""
    _check_size("tree size", size)
    if not 0 <= index < size:
        raise InvalidInput(f"leaf {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        split = _largest_power_below(end - start)
        if index < start + split:
            path.append(subtree_hash(source, start + split, end))
            end = start + split
        else:
            path.append(subtree_hash(source, start, start + split))
            start += split
    path.reverse()
    return path


def consistency_proof(source: SubtreeSource, old_size: int, new_size: int) -> list[bytes]:
    """RFC 6962 PROOF(old_size, D[0:new_size]): proves the old tree is a prefix of the new one.

    Empty when ``old_size`` is 0 or equals ``new_size``."""
    _check_size("old tree size", old_size)
    _check_size("new tree size", new_size)
    if old_size > new_size:
        raise InvalidInput(f"old size {old_size} is larger than new size {new_size}")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    start, end, whole = 0, new_size, True
    old_end = old_size
    # SUBPROOF(m, D[start:end], whole), iteratively; ranges stay RFC-shaped.
    while True:
        size = end - start
        if old_end - start == size:
            if not whole:
                proof.append(subtree_hash(source, start, end))
            break
        split = _largest_power_below(size)
        if old_end - start <= split:
            proof.append(subtree_hash(source, start + split, end))
            end = start + split
        else:
            proof.append(subtree_hash(source, start, start + split))
            start += split
            whole = False
    proof.reverse()
    return proof


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` (a leaf hash) sits at ``index`` of the tree of ``size`` with ``root``.

    Raises :class:`VerificationError` if it does not."""
    _check_hash("leaf hash", leaf)
    _check_hash("root hash", root)
    _check_proof(proof)
    if not 0 <= index < size:
        raise VerificationError(f"inclusion proof: leaf {index} is outside a tree of size {size}")
    node, last = index, size - 1
    computed = leaf
    for sibling in proof:
        if last == 0:
            raise VerificationError("inclusion proof is longer than the tree is deep")
        if node & 1 or node == last:
            computed = node_hash(sibling, computed)
            if not node & 1:
                while node and not node & 1:
                    node >>= 1
                    last >>= 1
        else:
            computed = node_hash(computed, sibling)
        node >>= 1
        last >>= 1
    if last != 0:
        raise VerificationError("inclusion proof is shorter than the tree is deep")
    if computed != root:
        raise VerificationError(f"inclusion proof for leaf {index} does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (``old_size``, ``old_root``) is a prefix of (``new_size``,
    ``new_root``). Raises :class:`VerificationError` if it is not (a rewritten history)."""
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    _check_proof(proof)
    if old_size < 0 or new_size < 0:
        raise VerificationError("consistency proof: negative tree size")
    if old_size > new_size:
        raise VerificationError(
            f"the log shrank from {old_size} to {new_size} entries: history was rewritten"
        )
    if old_size == new_size:
        if proof:
            raise VerificationError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise VerificationError(
                f"two different roots for the same tree size {old_size}: history was rewritten"
            )
        return
    if old_size == 0:
        if proof:
            raise VerificationError("consistency proof from the empty tree must be empty")
        if old_root != EMPTY_ROOT:
            raise VerificationError("the empty tree has another root")
        return
    if not proof:
        raise VerificationError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    node, last = old_size - 1, new_size - 1
    while node & 1:
        node >>= 1
        last >>= 1
    old_computed = new_computed = path[0]
    for sibling in path[1:]:
        if last == 0:
            raise VerificationError("consistency proof is longer than the tree is deep")
        if node & 1 or node == last:
            old_computed = node_hash(sibling, old_computed)
            new_computed = node_hash(sibling, new_computed)
            if not node & 1:
                while node and not node & 1:
                    node >>= 1
                    last >>= 1
        else:
            new_computed = node_hash(new_computed, sibling)
        node >>= 1
        last >>= 1
    if last != 0:
        raise VerificationError("consistency proof is shorter than the tree is deep")
    if old_computed != old_root:
        raise VerificationError(
            f"the log's first {old_size} entries no longer hash to the root seen before: "
            "history was rewritten"
        )
    if new_computed != new_root:
        raise VerificationError("consistency proof does not lead to the new root")


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH over a list of leaf hashes, in one bottom-up pass (an odd node moves up unchanged,
    which is the same tree as the RFC's split at the largest power of two)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            paired.append(level[-1])
        level = paired
    return level[0]


class MerkleTree:
    """All perfect subtrees of a list of leaf hashes, built in memory in one pass.

    Serves roots and proofs for every size up to its own (an auditor's view of the log)."""

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        self.extend(leaves)

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash, completing the perfect subtrees it closes."""
        _check_hash("leaf hash", leaf)
        self._levels[0].append(leaf)
        for level, index in completed_subtrees(len(self._levels[0]) - 1):
            if level == len(self._levels):
                self._levels.append([])
            below = self._levels[level - 1]
            self._levels[level].append(node_hash(below[2 * index], below[2 * index + 1]))

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Add many leaf hashes; the same result as appending one by one, faster."""
        for leaf in leaves:
            _check_hash("leaf hash", leaf)
        self._levels[0].extend(leaves)
        level = 1
        while True:
            below = self._levels[level - 1]
            if level == len(self._levels):
                if len(below) < 2:
                    break
                self._levels.append([])
            current = self._levels[level]
            done = len(current)
            current.extend(
                node_hash(below[2 * i], below[2 * i + 1]) for i in range(done, len(below) // 2)
            )
            level += 1

    def perfect(self, level: int, index: int) -> bytes:
        """Hash of a perfect subtree (see :class:`SubtreeSource`)."""
        try:
            if level < 0 or index < 0:
                raise IndexError
            return self._levels[level][index]
        except IndexError:
            raise InvalidInput(f"no complete subtree at level {level}, index {index}") from None

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        return self.perfect(0, index)

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (all of them by default)."""
        size = self.size if size is None else size
        if size > self.size:
            raise InvalidInput(f"tree has {self.size} leaves, not {size}")
        return root_from_perfect(self, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path of leaf ``index`` in the tree of the first ``size`` leaves."""
        size = self.size if size is None else size
        if size > self.size:
            raise InvalidInput(f"tree has {self.size} leaves, not {size}")
        return inclusion_proof(self, index, size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Proof that the first ``old_size`` leaves are a prefix of the first ``new_size``."""
        new_size = self.size if new_size is None else new_size
        if new_size > self.size:
            raise InvalidInput(f"tree has {self.size} leaves, not {new_size}")
        return consistency_proof(self, old_size, new_size)


def _largest_power_below(size: int) -> int:
    """The largest power of two strictly smaller than ``size`` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be a non-negative int, not {value!r}")


def _check_hash(name: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise VerificationError(f"{name} must be {HASH_SIZE} bytes")


def _check_proof(proof: Sequence[bytes]) -> None:
    if len(proof) > 64:
        raise VerificationError("proof has more than 64 hashes")
    for item in proof:
        _check_hash("proof hash", item)
