"""Signed server records: readers keep only valid, signed, current records of the right peer."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from corolla.errors import BadSignature, InvalidInput
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.records import (
    NodeState,
    RecordValidator,
    ServerRecord,
    announce,
    block_key,
    check_record,
    ed25519_key_of,
    fetch_records,
    peer_id_of,
    sign_record,
    write_libp2p_identity,
)
from corolla.node.server import choose_span
from corolla.verify.identity import Identity

MODEL = bytes(range(32))


def _record(identity: Identity, *, start=0, end=2, state=NodeState.ONLINE, ttl=60.0, **changes):
    record = ServerRecord(
        peer_id=peer_id_of(identity.public_key).to_base58(),
        public_key=identity.public_key,
        model_digest=MODEL,
        span_digest=bytes(32),
        start=start,
        end=end,
        throughput=250.5,
        cache_tokens_free=4096,
        quant="none",
        dtype="float32",
        state=state,
        version="0.1.0",
        expires_at=get_dht_time() + ttl,
    )
    return sign_record(identity, dataclasses.replace(record, **changes))


def _check(record_bytes: bytes, subkey: str, block: int = 0):
    return check_record(record_bytes, subkey, MODEL, block, get_dht_time())


def test_signed_record_round_trips_and_checks():
    identity = Identity.generate()
    record = _record(identity)
    assert ServerRecord.from_bytes(record.to_bytes()) == record
    assert _check(record.to_bytes(), record.peer_id, block=1) == record


def test_peer_id_is_derived_from_the_public_key_and_back():
    identity = Identity.generate()
    peer_id = peer_id_of(identity.public_key)
    assert peer_id != peer_id_of(Identity.generate().public_key)
    assert ed25519_key_of(peer_id.to_base58()) == identity.public_key
    assert ed25519_key_of("not a peer id") is None


def test_unsigned_record_is_ignored():
    record = dataclasses.replace(_record(Identity.generate()), signature=b"")
    with pytest.raises(InvalidInput):
        _check(record.to_bytes(), record.peer_id)


def test_tampered_record_is_ignored():
    record = _record(Identity.generate())
    tampered = dataclasses.replace(record, throughput=10_000.0)
    with pytest.raises(BadSignature):
        _check(tampered.to_bytes(), record.peer_id)


def test_record_signed_by_another_key_is_ignored():
    owner, forger = Identity.generate(), Identity.generate()
    genuine = _record(owner)
    forged = dataclasses.replace(genuine, public_key=forger.public_key)
    forged = dataclasses.replace(forged, signature=forger.sign(forged.signing_bytes()))
    with pytest.raises(BadSignature, match="peer id"):
        _check(forged.to_bytes(), genuine.peer_id)


def test_record_under_another_peers_subkey_is_ignored():
    record = _record(Identity.generate())
    other = peer_id_of(Identity.generate().public_key).to_base58()
    with pytest.raises(InvalidInput, match="subkey"):
        _check(record.to_bytes(), other)


def test_expired_record_is_ignored():
    record = _record(Identity.generate(), ttl=-1.0)
    with pytest.raises(InvalidInput, match="expired"):
        _check(record.to_bytes(), record.peer_id)


def test_record_for_another_model_or_block_is_ignored():
    identity = Identity.generate()
    other_model = _record(identity, model_digest=os.urandom(32))
    with pytest.raises(InvalidInput, match="another model"):
        _check(other_model.to_bytes(), other_model.peer_id)
    record = _record(identity, start=0, end=2)
    with pytest.raises(InvalidInput, match="under block"):
        _check(record.to_bytes(), record.peer_id, block=2)


@pytest.mark.parametrize(
    "value", [b"", b"garbage", b"\x07" + b"\xff" * 10, 12345, None, b"x" * 5000]
)
def test_garbage_values_are_ignored(value):
    with pytest.raises(InvalidInput):
        check_record(value, "12D3KooWabc", MODEL, 0, get_dht_time())


def test_choose_span_picks_the_worst_covered_window():
    a, b = Identity.generate(), Identity.generate()
    covered = _record(a, start=0, end=2)
    half = _record(b, start=2, end=3)
    records = [
        {covered.peer_id: covered},
        {covered.peer_id: covered},
        {half.peer_id: half},
        {},
        {},
    ]
    assert choose_span(records, 5, 2) == (3, 5)
    assert choose_span(records, 5, 4) == (1, 5)
    assert choose_span([{}] * 5, 5, 2) == (0, 2)
    offline = _record(a, start=3, end=5, state=NodeState.OFFLINE)
    records[3] = records[4] = {offline.peer_id: offline}
    assert choose_span(records, 5, 2) == (3, 5)
    with pytest.raises(InvalidInput):
        choose_span(records, 5, 6)


@pytest.fixture
def two_dhts(tmp_path):
    """A node's DHT (under its own Ed25519 key) and a reader's, both validating records."""
    identity = Identity.generate()
    key_file = tmp_path / "node.libp2p"
    write_libp2p_identity(identity, key_file)
    first = DHT(
        **p2p_options(),
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        identity_path=str(key_file),
        check_if_identity_free=False,
        record_validators=[RecordValidator()],
    )
    try:
        peers = [str(addr) for addr in first.get_visible_maddrs()]
        second = DHT(
            **p2p_options(),
            initial_peers=peers,
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=[RecordValidator()],
        )
        try:
            yield identity, first, second
        finally:
            second.shutdown()
    finally:
        first.shutdown()


async def test_fetch_keeps_only_valid_records_from_the_dht(two_dhts):
    identity, first, second = two_dhts
    assert first.peer_id == peer_id_of(identity.public_key)
    honest = _record(identity, start=0, end=2)
    assert await announce(first, honest)

    forger = Identity.generate()
    forged = dataclasses.replace(honest, public_key=forger.public_key, throughput=1e6)
    forged = dataclasses.replace(forged, signature=forger.sign(forged.signing_bytes()))
    tampered = dataclasses.replace(_record(forger, start=1, end=2), cache_tokens_free=10**9)
    expired = _record(Identity.generate(), ttl=-5.0)
    stranger = _record(Identity.generate(), start=0, end=2)
    later = get_dht_time() + 60
    entries = [
        (0, forged.to_bytes(), forged.peer_id + "x"),
        (1, tampered.to_bytes(), tampered.peer_id),
        (0, expired.to_bytes(), expired.peer_id),
        (0, stranger.to_bytes(), honest.peer_id + "y"),
        (1, b"garbage", "garbage-peer"),
    ]
    for block, value, subkey in entries:
        await second.store(block_key(MODEL, block), value, later, subkey=subkey, return_future=True)

    blocks = await fetch_records(second, MODEL, 3)
    assert [sorted(servers) for servers in blocks] == [[honest.peer_id], [honest.peer_id], []]
    assert blocks[0][honest.peer_id] == honest


async def test_offline_record_replaces_online_and_is_skipped_by_default(two_dhts):
    identity, first, second = two_dhts
    online = _record(identity, ttl=30)
    assert await announce(first, online)
    offline = _record(identity, state=NodeState.OFFLINE, ttl=31)
    assert await announce(first, offline)
    assert await fetch_records(second, MODEL, 2) == [{}, {}]
    everything = await fetch_records(second, MODEL, 2, include_offline=True)
    assert everything[0][offline.peer_id].state == NodeState.OFFLINE


async def test_nobody_can_overwrite_a_nodes_entry_in_validating_dhts(two_dhts):
    identity, first, second = two_dhts
    honest = _record(identity, ttl=30)
    assert await announce(first, honest)
    peers = [str(addr) for addr in first.get_visible_maddrs()]
    attacker = DHT(
        **p2p_options(), initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    try:
        forger = Identity.generate()
        forged = dataclasses.replace(honest, public_key=forger.public_key, throughput=1e6)
        forged = dataclasses.replace(forged, signature=forger.sign(forged.signing_bytes()))
        replayed = _record(identity, ttl=5)  # genuine, but its DHT expiry claims more
        far = get_dht_time() + 600
        for value in (b"garbage", forged.to_bytes(), replayed.to_bytes()):
            await attacker.store(
                block_key(MODEL, 0), value, far, subkey=honest.peer_id, return_future=True
            )
    finally:
        attacker.shutdown()
    blocks = await fetch_records(second, MODEL, 1)
    assert blocks[0] == {honest.peer_id: honest}
