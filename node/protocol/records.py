"""Signed server records in the DHT: build, sign, check, announce, fetch.

A node announces itself once per hosted block: key :func:`block_key` (model digest + block
index), subkey its libp2p peer id, value the canonical bytes of a :class:`ServerRecord` signed
with its Ed25519 key. The DHT entry expires at the record's own ``expires_at`` (about twice the
refresh period).

The node's libp2p identity *is* its Ed25519 key (:func:`write_libp2p_identity`), so a peer id is
a function of the public key (:func:`peer_id_of`). Readers therefore drop a record unless

- it decodes strictly and every field is in range,
- its signature verifies under the public key it carries,
- its peer id is the one derived from that public key, and equals the DHT subkey,
- it names the model asked for and covers the block it is stored under,
- it has not expired.

Because of the peer-id binding, nobody can announce a record pointing at someone else's peer,
and a client that reaches a peer over libp2p (which authenticates the peer's key) knows it talks
to the key that signed the record and will sign the receipts.

DHT nodes that run :class:`RecordValidator` (every Corolla node and client should) go further:
under a subkey that is an Ed25519 peer id they store only a valid record signed by that peer,
with a DHT expiry no later than the record's own, so nobody can overwrite a node's entry with
garbage, a forgery, or a replay of its older records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hivemind.dht import DHT
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from corolla.errors import BadSignature, InvalidInput, KeyFileError
from corolla.verify.digests import DIGEST_SIZE
from corolla.verify.encoding import canonical, decode, domain_message
from corolla.verify.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature

__all__ = [
    "RECORD_DOMAIN",
    "NodeState",
    "RecordValidator",
    "ServerRecord",
    "announce",
    "block_key",
    "check_record",
    "ed25519_key_of",
    "fetch_records",
    "peer_id_of",
    "sign_record",
    "write_libp2p_identity",
]

RECORD_DOMAIN = "server-record"
_MAX_RECORD_BYTES = 4096
_MAX_TEXT = 64


class NodeState:
    """A node's announced state."""

    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"
    ALL = (JOINING, ONLINE, OFFLINE)


@dataclass(frozen=True)
class ServerRecord:
    """What a node announces about itself; valid only with its ``signature``."""

    peer_id: str
    public_key: bytes
    model_digest: bytes
    span_digest: bytes
    start: int
    end: int
    throughput: float
    """Tokens per second through the whole span, measured with a real forward at startup."""
    cache_tokens_free: int
    quant: str
    dtype: str
    state: str
    version: str
    expires_at: float
    """DHT time (``hivemind.utils.get_dht_time``) after which the record is void."""
    signature: bytes = b""

    def __post_init__(self) -> None:
        _text("peer_id", self.peer_id)
        _bytes("public_key", self.public_key, PUBLIC_KEY_SIZE)
        _bytes("model_digest", self.model_digest, DIGEST_SIZE)
        _bytes("span_digest", self.span_digest, DIGEST_SIZE)
        _int("start", self.start, 0)
        _int("end", self.end, self.start + 1)
        _int("cache_tokens_free", self.cache_tokens_free, 0)
        for name in ("quant", "dtype", "version"):
            _text(name, getattr(self, name))
        if self.state not in NodeState.ALL:
            raise InvalidInput(f"record state must be one of {NodeState.ALL}")
        for name in ("throughput", "expires_at"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value < 1e15
            ):
                raise InvalidInput(f"record {name} must be a finite non-negative number")
        if self.signature:
            _bytes("signature", self.signature, SIGNATURE_SIZE)
        # Keep only what the encoding carries, so a record equals its decoded copy.
        object.__setattr__(self, "throughput", round(self.throughput * 1000) / 1000)
        object.__setattr__(self, "expires_at", round(self.expires_at * 1000) / 1000)

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)

    def _encoded_fields(self) -> dict[str, object]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del fields["signature"]
        # Canonical encoding has no floats: thousandths of a token/s, milliseconds.
        fields["throughput"] = round(self.throughput * 1000)
        fields["expires_at"] = round(self.expires_at * 1000)
        return fields

    def signing_bytes(self) -> bytes:
        """Domain-separated canonical bytes of every field but the signature."""
        return domain_message(RECORD_DOMAIN, self._encoded_fields())

    def to_bytes(self) -> bytes:
        """The DHT value: canonical bytes of the fields and the signature."""
        return canonical({"fields": self._encoded_fields(), "signature": self.signature})

    @classmethod
    def from_bytes(cls, data: object) -> ServerRecord:
        """Parse :meth:`to_bytes` strictly; raises only :class:`InvalidInput`."""
        if not isinstance(data, bytes) or len(data) > _MAX_RECORD_BYTES:
            raise InvalidInput("a server record must be at most 4 KiB of bytes")
        value = decode(data, max_items=64)
        if not isinstance(value, dict) or set(value) != {"fields", "signature"}:
            raise InvalidInput("a server record holds exactly fields and signature")
        fields = value["fields"]
        names = {f.name for f in dataclasses.fields(cls)} - {"signature"}
        if not isinstance(fields, dict) or set(fields) != names:
            raise InvalidInput(f"a server record's fields are exactly {sorted(names)}")
        for name in ("throughput", "expires_at"):
            _int(name, fields[name], 0)
        fields = dict(fields)
        fields["throughput"] = fields["throughput"] / 1000
        fields["expires_at"] = fields["expires_at"] / 1000
        signature = value["signature"]
        _bytes("signature", signature, SIGNATURE_SIZE)
        return cls(**fields, signature=signature)

    def verify(self) -> None:
        """Check the signature and the peer-id binding; raise :class:`BadSignature` if not."""
        verify_signature(self.public_key, self.signing_bytes(), self.signature)
        if self.peer_id != peer_id_of(self.public_key).to_base58():
            raise BadSignature("record's peer id is not the one its public key derives")


def sign_record(identity: Identity, record: ServerRecord) -> ServerRecord:
    """``record`` with ``identity``'s public key and signature."""
    unsigned = dataclasses.replace(record, public_key=identity.public_key, signature=b"")
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))


def block_key(model_digest: bytes, index: int) -> str:
    """DHT key under which the servers of block ``index`` of a model announce themselves."""
    return f"corolla/{model_digest.hex()}/block/{index}"


# --------------------------------------------------------------------------- peer identity


def _public_key_proto(public_key: bytes) -> bytes:
    return crypto_pb2.PublicKey(
        key_type=crypto_pb2.KeyType.Ed25519, data=public_key
    ).SerializeToString()


def peer_id_of(public_key: bytes) -> PeerID:
    """The libp2p peer id of an Ed25519 public key (an identity multihash of the key)."""
    _bytes("public_key", public_key, PUBLIC_KEY_SIZE)
    encoded = _public_key_proto(public_key)
    return PeerID(bytes([0x00, len(encoded)]) + encoded)


def ed25519_key_of(peer_id: str) -> bytes | None:
    """The Ed25519 public key a base58 peer id encodes, or ``None`` if it encodes none."""
    try:
        raw = PeerID.from_base58(peer_id).to_bytes()
    except Exception:
        return None
    if len(raw) < 2 or raw[0] != 0x00 or raw[1] != len(raw) - 2:
        return None
    try:
        proto = crypto_pb2.PublicKey.FromString(raw[2:])
    except Exception:
        return None
    if proto.key_type != crypto_pb2.KeyType.Ed25519 or len(proto.data) != PUBLIC_KEY_SIZE:
        return None
    if _public_key_proto(proto.data) != raw[2:]:
        return None
    return proto.data


def write_libp2p_identity(identity: Identity, path: str | os.PathLike[str]) -> PeerID:
    """Write ``identity`` as a libp2p private key file (owner-only) for ``identity_path``.

    The libp2p daemon then runs under the same Ed25519 key the node signs with, so its peer id
    is :func:`peer_id_of` of the node's public key.
    """
    path = Path(path)
    seed = identity.export_seed()  # the key file's own secret, re-encoded for libp2p
    proto = crypto_pb2.PrivateKey(
        key_type=crypto_pb2.KeyType.Ed25519, data=seed + identity.public_key
    ).SerializeToString()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            if path.read_bytes() == proto:
                return peer_id_of(identity.public_key)
            path.chmod(0o600)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(proto)
        path.chmod(0o400)
    except OSError as error:
        raise KeyFileError(f"cannot write libp2p identity {path}: {error.strerror}") from None
    return peer_id_of(identity.public_key)


# --------------------------------------------------------------------------- checks

_Check = Callable[[ServerRecord, str, bytes, int, float], None]


def _signed(record: ServerRecord, subkey: str, model: bytes, block: int, now: float) -> None:
    record.verify()


def _subkey_is_peer(
    record: ServerRecord, subkey: str, model: bytes, block: int, now: float
) -> None:
    if record.peer_id != subkey:
        raise InvalidInput("record's peer id differs from the DHT subkey it is stored under")


def _names_model(record: ServerRecord, subkey: str, model: bytes, block: int, now: float) -> None:
    if record.model_digest != model:
        raise InvalidInput("record names another model")


def _covers_block(record: ServerRecord, subkey: str, model: bytes, block: int, now: float) -> None:
    if block not in record.blocks:
        raise InvalidInput(f"record for blocks [{record.start}, {record.end}) under block {block}")


def _not_expired(record: ServerRecord, subkey: str, model: bytes, block: int, now: float) -> None:
    if record.expires_at <= now:
        raise InvalidInput("record has expired")


RECORD_CHECKS: tuple[_Check, ...] = (
    _subkey_is_peer,
    _names_model,
    _covers_block,
    _not_expired,
    _signed,
)
"""Cheap checks first; the signature last."""


def check_record(
    value: object, subkey: object, model_digest: bytes, block: int, now: float
) -> ServerRecord:
    """The record in a DHT entry if it passes every check; raises InvalidInput/BadSignature."""
    if not isinstance(subkey, str):
        raise InvalidInput("DHT subkey must be a peer id string")
    record = ServerRecord.from_bytes(value)
    for check in RECORD_CHECKS:
        check(record, subkey, model_digest, block, now)
    return record


_EXPIRY_SLACK = 1.0
"""Seconds a DHT expiry may exceed the record's own (rounding, clock skew between processes)."""


class RecordValidator(RecordValidatorBase):
    """A hivemind DHT validator guarding the entries of Ed25519 peers (see the module doc).

    Entries under any other subkey are left to other validators (accepted here).
    """

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:
            return True
        if not isinstance(subkey, str) or ed25519_key_of(subkey) is None:
            return True
        try:
            server = ServerRecord.from_bytes(MSGPackSerializer.loads(record.value))
            server.verify()
        except Exception:
            return False
        return (
            server.peer_id == subkey and record.expiration_time <= server.expires_at + _EXPIRY_SLACK
        )


# --------------------------------------------------------------------------- DHT


async def announce(dht: DHT, record: ServerRecord) -> bool:
    """Store a signed record under every block it covers; True if every store succeeded."""
    value = record.to_bytes()
    futures = [
        dht.store(
            block_key(record.model_digest, block),
            value,
            expiration_time=record.expires_at,
            subkey=record.peer_id,
            return_future=True,
        )
        for block in record.blocks
    ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    return all(result is True for result in results)


async def fetch_records(
    dht: DHT,
    model_digest: bytes,
    num_blocks: int,
    *,
    include_offline: bool = False,
    now: float | None = None,
) -> list[dict[str, ServerRecord]]:
    """For each block, the valid records of its servers, by peer id.

    Records that fail any check are dropped silently (they are untrusted input); so are
    ``offline`` ones unless ``include_offline``.
    """
    futures = [
        dht.get(block_key(model_digest, block), latest=True, return_future=True)
        for block in range(num_blocks)
    ]
    entries = await asyncio.gather(*futures, return_exceptions=True)
    now = get_dht_time() if now is None else now
    result: list[dict[str, ServerRecord]] = []
    for block, entry in enumerate(entries):
        servers: dict[str, ServerRecord] = {}
        subentries = getattr(entry, "value", None)
        if isinstance(subentries, dict):
            for subkey, item in subentries.items():
                try:
                    record = check_record(
                        getattr(item, "value", None), subkey, model_digest, block, now
                    )
                except (InvalidInput, BadSignature):
                    continue
                if include_offline or record.state != NodeState.OFFLINE:
                    servers[subkey] = record
        result.append(servers)
    return result


# --------------------------------------------------------------------------- field checks


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**62:
        raise InvalidInput(f"record {name} must be an int >= {low}")


def _bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidInput(f"record {name} must be {size} bytes")


def _text(name: str, value: object) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT:
        raise InvalidInput(f"record {name} must be a string of 1..{_MAX_TEXT} characters")
