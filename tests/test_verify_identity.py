"""Ed25519 identities, owner-only key files, and signature checks that never leak nacl errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.errors import BadSignature, InvalidInput, KeyFileError
from corolla.verify.identity import (
    KEY_FILE_HEADER,
    Identity,
    load_identity,
    load_or_create_identity,
    peer_name_of,
    save_identity,
    verify_signature,
)

# RFC 8032, section 7.1, test 1 (empty message).
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b4"
    "6bd25bf5f0595bbe24655141438e7a100b"
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_from_seed_matches_the_rfc_8032_test_vector() -> None:
    identity = Identity.from_seed(RFC_SEED)
    assert identity.public_key == RFC_PUBLIC
    assert identity.sign(b"") == RFC_SIGNATURE
    verify_signature(RFC_PUBLIC, b"", RFC_SIGNATURE)


def test_from_seed_is_deterministic_and_generate_is_not() -> None:
    assert Identity.from_seed(bytes(32)) == Identity.from_seed(bytes(32))
    assert Identity.from_seed(bytes(32)) != Identity.from_seed(bytes([1]) * 32)
    assert Identity.generate() != Identity.generate()


@pytest.mark.parametrize("seed", [bytes(31), bytes(33), "00" * 32, None])
def test_from_seed_rejects_anything_but_32_bytes(seed: object) -> None:
    with pytest.raises(InvalidInput):
        Identity.from_seed(seed)  # type: ignore[arg-type]


def test_peer_name_is_the_hex_of_the_first_8_public_key_bytes() -> None:
    identity = Identity.from_seed(RFC_SEED)
    assert identity.peer_name == "d75a980182b10ab7"
    assert peer_name_of(identity.public_key) == identity.peer_name


def test_repr_names_the_peer_and_hides_the_seed() -> None:
    identity = Identity.from_seed(RFC_SEED)
    assert identity.peer_name in repr(identity)
    assert RFC_SEED.hex() not in repr(identity)


def test_a_signature_verifies_only_for_its_message_and_key() -> None:
    alice, bob = Identity.from_seed(bytes(32)), Identity.from_seed(bytes([1]) * 32)
    signature = alice.sign(b"message")
    assert len(signature) == 64
    verify_signature(alice.public_key, b"message", signature)
    with pytest.raises(BadSignature):
        verify_signature(alice.public_key, b"messagf", signature)
    with pytest.raises(BadSignature):
        verify_signature(bob.public_key, b"message", signature)
    forged = bytearray(signature)
    forged[10] ^= 0x01
    with pytest.raises(BadSignature):
        verify_signature(alice.public_key, b"message", bytes(forged))


@pytest.mark.parametrize(
    ("public_key", "message", "signature"),
    [
        (bytes(31), b"m", bytes(64)),
        (bytes(33), b"m", bytes(64)),
        (RFC_PUBLIC, b"m", bytes(63)),
        (RFC_PUBLIC, b"m", bytes(65)),
        (None, b"m", bytes(64)),
        (RFC_PUBLIC.hex(), b"m", bytes(64)),
        (RFC_PUBLIC, "m", bytes(64)),
        (RFC_PUBLIC, b"m", None),
        (bytes(32), b"m", bytes(64)),  # a small-order point
        (b"\xff" * 32, b"m", b"\xff" * 64),  # not a point, scalar out of range
    ],
)
def test_malformed_keys_and_signatures_raise_bad_signature(
    public_key: object, message: object, signature: object
) -> None:
    with pytest.raises(BadSignature):
        verify_signature(public_key, message, signature)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=64), st.binary(max_size=70))
def test_random_keys_and_signatures_raise_only_bad_signature(
    public_key: bytes, message: bytes, signature: bytes
) -> None:
    with pytest.raises(BadSignature):
        verify_signature(public_key, message, signature)


def test_load_or_create_writes_an_owner_only_file_and_loads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    created = load_or_create_identity(path)
    assert _mode(path) == 0o600
    assert path.read_text().splitlines()[0] == KEY_FILE_HEADER
    assert load_or_create_identity(path) == created
    assert load_identity(path) == created
    assert [entry.name for entry in path.parent.iterdir()] == ["node.key"]  # no temp file left


def test_load_or_create_makes_an_owner_only_file_despite_a_permissive_umask(
    tmp_path: Path,
) -> None:
    previous = os.umask(0)
    try:
        path = tmp_path / "node.key"
        load_or_create_identity(path)
    finally:
        os.umask(previous)
    assert _mode(path) == 0o600


def test_save_identity_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first, second = Identity.from_seed(bytes(32)), Identity.from_seed(bytes([7]) * 32)
    save_identity(first, path)
    with pytest.raises(KeyFileError, match="already exists"):
        save_identity(second, path)
    assert load_identity(path) == first
    save_identity(second, path, overwrite=True)
    assert load_identity(path) == second
    assert _mode(path) == 0o600


def test_missing_key_file_is_reported_clearly(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_identity(tmp_path / "absent.key")


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o700, 0o610])
def test_key_file_readable_by_others_is_refused_like_ssh(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    save_identity(Identity.from_seed(bytes(32)), path)
    path.chmod(mode)
    if mode & 0o077:
        with pytest.raises(KeyFileError, match=r"too open.*chmod 600"):
            load_identity(path)
    else:
        assert load_identity(path) == Identity.from_seed(bytes(32))


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_identity(Identity.from_seed(bytes(32)), path)
    os.chown(path, 12345, 12345)
    with pytest.raises(KeyFileError, match="owned by uid 12345"):
        load_identity(path)


def _write_owner_only(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def test_every_truncation_of_a_key_file_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.key"
    save_identity(Identity.from_seed(RFC_SEED), good)
    content = good.read_bytes()
    path = tmp_path / "cut.key"
    for length in range(len(content) - 1):  # the final newline is optional
        _write_owner_only(path, content[:length])
        with pytest.raises(KeyFileError):
            load_identity(path)


def test_a_corrupted_seed_is_detected_by_its_public_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_identity(Identity.from_seed(RFC_SEED), path)
    text = path.read_text()
    seed_hex = RFC_SEED.hex()
    corrupted = seed_hex[:10] + ("0" if seed_hex[10] != "0" else "1") + seed_hex[11:]
    _write_owner_only(path, text.replace(seed_hex, corrupted).encode())
    with pytest.raises(KeyFileError, match="does not derive its public key"):
        load_identity(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff" * 40,
        b"-----BEGIN OPENSSH PRIVATE KEY-----\n",
        RFC_SEED,
        f"corolla-ed25519-v2\nseed {RFC_SEED.hex()}\npublic {RFC_PUBLIC.hex()}\n".encode(),
        f"{KEY_FILE_HEADER}\nseed {RFC_SEED.hex().upper()}\npublic {RFC_PUBLIC.hex()}\n".encode(),
        f"{KEY_FILE_HEADER}\nseed {RFC_SEED.hex()}\n".encode(),
        f"{KEY_FILE_HEADER}\nseed {RFC_SEED.hex()}\npublic {RFC_PUBLIC.hex()}\nextra\n".encode(),
        f"{KEY_FILE_HEADER}\nseed {RFC_SEED.hex()}\npublic {RFC_PUBLIC.hex()}\n".encode()
        + b" " * 5000,
    ],
    ids=[
        "empty",
        "binary",
        "ssh-key",
        "raw-seed",
        "other-version",
        "uppercase",
        "no-public",
        "extra-line",
        "oversized",
    ],
)
def test_corrupt_key_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    _write_owner_only(path, content)
    with pytest.raises(KeyFileError):
        load_identity(path)


def test_load_or_create_never_overwrites_a_corrupt_key_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    _write_owner_only(path, b"corolla-ed25519-v1\nseed 12\n")
    with pytest.raises(KeyFileError):
        load_or_create_identity(path)
    assert path.read_bytes() == b"corolla-ed25519-v1\nseed 12\n"


def test_a_directory_or_a_fifo_at_the_key_path_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(directory)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(fifo)


def test_an_uncreatable_key_directory_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(KeyFileError, match="cannot create directory"):
        load_or_create_identity(blocker / "keys" / "node.key")
