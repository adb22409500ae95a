"""RFC 6962 Merkle hashing and proofs agree with the RFC and with Certificate Transparency."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from corolla.errors import BadSignature, InvalidInput, VerificationError
from corolla.verify.checkpoints import Checkpoint, sign_checkpoint, verify_checkpoint
from corolla.verify.identity import Identity
from corolla.verify.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    completed_subtrees,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# Certificate Transparency's reference leaves and roots (RFC 6962 test data).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (0-based leaf, tree size, path)
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH exactly as RFC 6962 section 2.1 writes it, recursively."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(
        b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])
    ).digest()


def reference_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) from RFC 6962 section 2.1.1."""
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return [*reference_path(m, leaves[:k]), reference_root(leaves[k:])]
    return [*reference_path(m - k, leaves[k:]), reference_root(leaves[:k])]


def reference_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) from RFC 6962 section 2.1.2."""
    n = len(leaves)
    if m == n:
        return [] if whole else [reference_root(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*reference_subproof(m, leaves[:k], whole), reference_root(leaves[k:])]
    return [*reference_subproof(m - k, leaves[k:], False), reference_root(leaves[:k])]


def hashes(count: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(count)]


def test_roots_match_certificate_transparency_for_every_size_up_to_eight() -> None:
    leaves = [leaf_hash(data) for data in CT_LEAVES]
    tree = MerkleTree()
    assert tree.root() == EMPTY_ROOT == bytes.fromhex(CT_ROOTS[0])
    for size in range(1, 9):
        tree.append(leaves[size - 1])
        assert tree.root().hex() == CT_ROOTS[size]
        assert root_hash(leaves[:size]).hex() == CT_ROOTS[size]


def test_inclusion_and_consistency_proofs_match_certificate_transparency() -> None:
    tree = MerkleTree([leaf_hash(data) for data in CT_LEAVES])
    for index, size, expected in CT_INCLUSION:
        proof = tree.inclusion_proof(index, size)
        assert [p.hex() for p in proof] == expected
        verify_inclusion(tree.leaf(index), index, size, proof, tree.root(size))
    for old, new, expected in CT_CONSISTENCY:
        proof = tree.consistency_proof(old, new)
        assert [p.hex() for p in proof] == expected
        verify_consistency(old, new, tree.root(old), tree.root(new), proof)


def test_every_root_and_proof_equals_the_rfc_recursion_up_to_seventy_leaves() -> None:
    leaves = hashes(70)
    tree = MerkleTree(leaves)
    for size in range(0, 71):
        root = tree.root(size)
        assert root == reference_root(leaves[:size])
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert proof == reference_path(index, leaves[:size])
            verify_inclusion(leaves[index], index, size, proof, root)
        for old in range(1, size + 1):
            proof = tree.consistency_proof(old, size)
            expected = [] if old == size else reference_subproof(old, leaves[:size], True)
            assert proof == expected
            verify_consistency(old, size, tree.root(old), root, proof)


def test_appending_one_by_one_and_extending_in_bulk_build_the_same_tree() -> None:
    leaves = hashes(1000)
    one_by_one = MerkleTree()
    for leaf in leaves:
        one_by_one.append(leaf)
    bulk = MerkleTree(leaves[:333])
    bulk.extend(leaves[333:])
    assert one_by_one.root() == bulk.root() == root_hash(leaves) == reference_root(leaves)
    assert bulk.inclusion_proof(777) == one_by_one.inclusion_proof(777)


def test_completed_subtrees_name_each_perfect_subtree_exactly_once() -> None:
    seen: set[tuple[int, int]] = set()
    for index in range(64):
        for level, position in completed_subtrees(index):
            assert (position + 1) << level == index + 1
            seen.add((level, position))
    assert seen == {(level, i) for level in range(1, 7) for i in range(64 >> level)}


def test_a_changed_leaf_or_proof_hash_fails_inclusion() -> None:
    leaves = hashes(13)
    tree = MerkleTree(leaves)
    proof = tree.inclusion_proof(6)
    with pytest.raises(VerificationError):
        verify_inclusion(leaf_hash(b"forged"), 6, 13, proof, tree.root())
    with pytest.raises(VerificationError):
        verify_inclusion(leaves[6], 5, 13, proof, tree.root())
    with pytest.raises(VerificationError):
        verify_inclusion(leaves[6], 6, 13, proof[:-1], tree.root())
    with pytest.raises(VerificationError):
        verify_inclusion(leaves[6], 6, 13, [*proof, proof[0]], tree.root())
    for position in range(len(proof)):
        forged = list(proof)
        forged[position] = node_hash(forged[position], forged[position])
        with pytest.raises(VerificationError):
            verify_inclusion(leaves[6], 6, 13, forged, tree.root())


def test_a_rewritten_history_fails_the_consistency_check() -> None:
    leaves = hashes(21)
    honest = MerkleTree(leaves)
    rewritten_leaves = list(leaves)
    rewritten_leaves[4] = leaf_hash(b"rewritten")
    rewritten = MerkleTree(rewritten_leaves)
    proof = rewritten.consistency_proof(9, 21)
    with pytest.raises(VerificationError, match="history was rewritten"):
        verify_consistency(9, 21, honest.root(9), rewritten.root(), proof)
    with pytest.raises(VerificationError, match="shrank"):
        verify_consistency(21, 9, honest.root(), honest.root(9), [])
    with pytest.raises(VerificationError):
        verify_consistency(9, 9, honest.root(9), rewritten.root(9), [])
    good = honest.consistency_proof(9, 21)
    with pytest.raises(VerificationError):
        verify_consistency(9, 21, honest.root(9), honest.root(), good[:-1])


def test_proof_requests_outside_the_tree_are_invalid_input() -> None:
    tree = MerkleTree(hashes(5))
    with pytest.raises(InvalidInput):
        inclusion_proof(tree, 5, 5)
    with pytest.raises(InvalidInput):
        consistency_proof(tree, 6, 5)
    with pytest.raises(InvalidInput):
        tree.root(6)
    with pytest.raises(VerificationError):
        verify_inclusion(b"short", 0, 1, [], EMPTY_ROOT)


def test_a_signed_checkpoint_verifies_and_round_trips_through_json() -> None:
    ledger = Identity.from_seed(bytes(range(32)))
    checkpoint = sign_checkpoint(ledger, "corolla-test", 8, bytes.fromhex(CT_ROOTS[8]), 1_700)
    verify_checkpoint(checkpoint, ledger_key=ledger.public_key, origin="corolla-test")
    again = Checkpoint.from_dict(json.loads(json.dumps(checkpoint.to_dict())))
    assert again == checkpoint
    verify_checkpoint(again, ledger_key=ledger.public_key)


@pytest.mark.parametrize(
    "change",
    [
        {"origin": "another-log"},
        {"tree_size": 9},
        {"root_hash": bytes(32)},
        {"timestamp": 1_701},
        {"ledger_key": Identity.from_seed(bytes(32)).public_key},
    ],
)
def test_changing_any_checkpoint_field_breaks_its_signature(change: dict[str, object]) -> None:
    ledger = Identity.from_seed(bytes(range(32)))
    checkpoint = sign_checkpoint(ledger, "corolla-test", 8, bytes.fromhex(CT_ROOTS[8]), 1_700)
    with pytest.raises(BadSignature):
        verify_checkpoint(dataclasses.replace(checkpoint, **change))


def test_a_checkpoint_from_another_key_or_origin_is_refused_when_pinned() -> None:
    ledger = Identity.from_seed(bytes(range(32)))
    impostor = Identity.from_seed(bytes(32))
    checkpoint = sign_checkpoint(impostor, "corolla-test", 1, bytes.fromhex(CT_ROOTS[1]), 5)
    verify_checkpoint(checkpoint)
    with pytest.raises(BadSignature, match="expected the ledger's key"):
        verify_checkpoint(checkpoint, ledger_key=ledger.public_key)
    with pytest.raises(BadSignature, match="expected"):
        verify_checkpoint(checkpoint, origin="corolla-main")


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"origin": "x"},
        {
            "origin": "x",
            "tree_size": -1,
            "root_hash": "00" * 32,
            "timestamp": 0,
            "ledger_key": "00" * 32,
            "signature": "00" * 64,
        },
        {
            "origin": "x",
            "tree_size": 1,
            "root_hash": "ZZ" * 32,
            "timestamp": 0,
            "ledger_key": "00" * 32,
            "signature": "00" * 64,
        },
    ],
)
def test_malformed_checkpoint_dicts_are_invalid_input(data: object) -> None:
    with pytest.raises(InvalidInput):
        Checkpoint.from_dict(data)
