"""Ed25519 identities, their key files, and signature checks.

Every node, client and ledger has one :class:`Identity`. On disk it is a small text file that only
its owner may read, like an ssh private key::

    corolla-ed25519-v1
    seed <64 hex digits>
    public <64 hex digits>

The public key is stored beside the seed so that a corrupted seed is caught on load (it would
derive another key) rather than silently becoming a new identity.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path

import nacl.exceptions
import nacl.signing

from corolla.errors import BadSignature, InvalidInput, KeyFileError

__all__ = [
    "KEY_FILE_HEADER",
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "SIGNATURE_SIZE",
    "Identity",
    "load_identity",
    "load_or_create_identity",
    "peer_name_of",
    "save_identity",
    "verify_signature",
]

KEY_FILE_HEADER = "corolla-ed25519-v1"
SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_PEER_NAME_BYTES = 8
_MAX_KEY_FILE_SIZE = 4096
_KEY_FILE_PATTERN = re.compile(
    rf"{re.escape(KEY_FILE_HEADER)}\nseed ([0-9a-f]{{64}})\npublic ([0-9a-f]{{64}})\n?"
)


def peer_name_of(public_key: bytes) -> str:
    """The short printable name of a public key: hex of its first 8 bytes."""
    return bytes(public_key[:_PEER_NAME_BYTES]).hex()


class Identity:
    """An Ed25519 signing key: the one secret a participant holds."""

    __slots__ = ("_public_key", "_seed", "_signing_key")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
            raise InvalidInput(f"an Ed25519 seed must be {SEED_SIZE} bytes")
        self._seed = seed
        self._signing_key = nacl.signing.SigningKey(seed)
        self._public_key = bytes(self._signing_key.verify_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity from the operating system's random source."""
        return cls(secrets.token_bytes(SEED_SIZE))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity derived deterministically from a 32-byte seed (tests, simulations)."""
        return cls(seed)

    def export_seed(self) -> bytes:
        """The 32-byte private seed, for re-encoding the same key in another format (libp2p).

        Anyone holding it can sign as this identity: never send or log it.
        """
        return self._seed

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def peer_name(self) -> str:
        """Short printable id: hex of the first 8 bytes of the public key."""
        return peer_name_of(self._public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._signing_key.sign(bytes(message)).signature

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other._public_key == self._public_key

    def __hash__(self) -> int:
        return hash(self._public_key)

    def __repr__(self) -> str:
        return f"Identity(peer_name={self.peer_name!r})"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature; raise :class:`BadSignature` for anything but a valid one."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise BadSignature(f"a public key must be {PUBLIC_KEY_SIZE} bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise BadSignature(f"a signature must be {SIGNATURE_SIZE} bytes")
    if not isinstance(message, bytes | bytearray | memoryview):
        raise BadSignature(f"a signed message must be bytes, not {type(message).__name__}")
    try:
        nacl.signing.VerifyKey(public_key).verify(bytes(message), signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise BadSignature(
            f"signature does not verify under key {peer_name_of(public_key)}"
        ) from None


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Read an identity key file, refusing it (like ssh) unless only its owner can read it."""
    path = Path(path)
    try:
        # Non-blocking so that a FIFO planted at the path cannot hang us; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise KeyFileError(f"identity key file {path} does not exist") from None
    except OSError as error:
        raise KeyFileError(f"cannot open identity key file {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        _check_key_file_stat(path, info)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(_MAX_KEY_FILE_SIZE + 1)
    except OSError as error:
        raise KeyFileError(f"cannot read identity key file {path}: {error.strerror}") from None
    finally:
        os.close(fd)
    return _parse_key_file(path, data)


def load_or_create_identity(path: str | os.PathLike[str]) -> Identity:
    """Load the identity at ``path``, or create it (owner-only, atomically) if there is none."""
    path = Path(path)
    if os.path.lexists(path):
        return load_identity(path)
    identity = Identity.generate()
    if not _write_key_file(path, _format_key_file(identity), overwrite=False):
        # Another process created it between our check and our write: theirs wins.
        return load_identity(path)
    return identity


def save_identity(
    identity: Identity, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write ``identity`` to a new owner-only key file (atomically; never half-written)."""
    path = Path(path)
    if not _write_key_file(path, _format_key_file(identity), overwrite=overwrite):
        raise KeyFileError(f"identity key file {path} already exists; not overwriting it")


def _check_key_file_stat(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"identity key file {path} is not a regular file")
    if os.name != "posix":
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"permissions {mode:04o} for identity key file {path} are too open: it must be "
            f"accessible by its owner only (run: chmod 600 {path})"
        )
    if info.st_uid != os.geteuid():
        raise KeyFileError(
            f"identity key file {path} is owned by uid {info.st_uid}, not by the current user "
            f"(uid {os.geteuid()})"
        )


def _format_key_file(identity: Identity) -> bytes:
    return (
        f"{KEY_FILE_HEADER}\nseed {identity._seed.hex()}\npublic {identity.public_key.hex()}\n"
    ).encode("ascii")


def _parse_key_file(path: Path, data: bytes) -> Identity:
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"identity key file {path} is too large to be a key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"identity key file {path} is corrupt: not ASCII text") from None
    if not text.startswith(KEY_FILE_HEADER + "\n"):
        raise KeyFileError(
            f"identity key file {path} is not a Corolla key file "
            f"(its first line must be {KEY_FILE_HEADER!r})"
        )
    match = _KEY_FILE_PATTERN.fullmatch(text)
    if match is None:
        raise KeyFileError(
            f"identity key file {path} is corrupt or truncated "
            "(expected a 'seed' and a 'public' line of 64 lowercase hex digits)"
        )
    identity = Identity(bytes.fromhex(match.group(1)))
    if identity.public_key != bytes.fromhex(match.group(2)):
        raise KeyFileError(
            f"identity key file {path} is corrupt: its seed does not derive its public key"
        )
    return identity


def _write_key_file(path: Path, content: bytes, *, overwrite: bool) -> bool:
    """Write ``content`` to ``path`` with mode 0600; return False if it exists and must stay."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise KeyFileError(
            f"cannot create directory {path.parent} for identity key file: {error.strerror}"
        ) from None
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(temporary, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            os.close(fd)
        written = _publish(temporary, path, overwrite=overwrite)
        _fsync_directory(path.parent)
        return written
    except OSError as error:
        raise KeyFileError(f"cannot write identity key file {path}: {error.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _publish(temporary: Path, path: Path, *, overwrite: bool) -> bool:
    if overwrite:
        os.replace(temporary, path)
        return True
    try:
        # A hard link never replaces an existing file, so a concurrent creator is never clobbered.
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        # Filesystems without hard links: check, then rename (a narrow race, but never partial).
        if os.path.lexists(path):
            return False
        os.replace(temporary, path)
    return True


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
