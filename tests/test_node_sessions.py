"""The session table: cache budget, ids, and step order."""

from __future__ import annotations

import os

import pytest

from corolla.errors import InvalidInput, NodeBusy
from corolla.node.model.span import load_span
from corolla.node.sessions import SessionConfig, SessionTable
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request
from corolla.version import PROTOCOL_VERSION

CLIENT = Identity.generate()


@pytest.fixture(scope="module")
def span(bloom_dir):
    return load_span(bloom_dir, 0, 1)


def _request(session_id: bytes, step: int, marker: int = 0):
    return sign_request(
        CLIENT,
        protocol_version=PROTOCOL_VERSION,
        model_digest=bytes(32),
        span_digest=bytes(32),
        start=0,
        end=1,
        session_id=session_id,
        step=step,
        position=step,
        tokens=1,
        input_digest=bytes([marker]) * 32,
    )


def test_sessions_reserve_batch_times_max_length_and_give_it_back(span):
    table = SessionTable(SessionConfig(max_cache_tokens=100))
    first = table.open(os.urandom(16), CLIENT.public_key, 2, 30, span)
    assert (table.used_tokens, table.free_tokens, len(table)) == (60, 40, 1)
    with pytest.raises(NodeBusy, match="no room"):
        table.open(os.urandom(16), CLIENT.public_key, 1, 41, span)
    table.open(os.urandom(16), CLIENT.public_key, 1, 40, span)
    assert table.free_tokens == 0
    table.close(first)
    table.close(first)  # idempotent
    assert table.free_tokens == 60


def test_closing_a_session_again_spares_a_newer_one_with_the_same_id(span):
    table = SessionTable(SessionConfig(max_cache_tokens=100))
    session_id = os.urandom(16)
    old = table.open(session_id, CLIENT.public_key, 1, 30, span)
    table.close(old)
    new = table.open(session_id, CLIENT.public_key, 1, 30, span)
    table.close(old)  # a stream's second, late close of its own session
    assert table.get(session_id) is new and table.free_tokens == 70


def test_a_session_id_cannot_be_opened_twice_or_used_unopened(span):
    table = SessionTable(SessionConfig())
    session_id = os.urandom(16)
    table.open(session_id, CLIENT.public_key, 1, 8, span)
    with pytest.raises(InvalidInput, match="already open"):
        table.open(session_id, CLIENT.public_key, 1, 8, span)
    with pytest.raises(InvalidInput, match="unknown session"):
        table.get(os.urandom(16))
    assert table.get(session_id).position == 0


def test_steps_go_in_order_and_only_the_last_one_can_be_replayed(span):
    table = SessionTable(SessionConfig())
    session = table.open(os.urandom(16), CLIENT.public_key, 1, 8, span)
    first = _request(session.session_id, 0)
    assert session.replay_of(first) is None  # the next step: compute it
    session.advance(first, "reply-0", bytes(32))
    assert session.replay_of(first) == "reply-0"
    with pytest.raises(InvalidInput, match="another request"):
        session.replay_of(_request(session.session_id, 0, marker=1))
    with pytest.raises(InvalidInput, match="skips ahead"):
        session.replay_of(_request(session.session_id, 2))
    second = _request(session.session_id, 1)
    assert session.replay_of(second) is None
    session.advance(second, "reply-1", bytes(32))
    with pytest.raises(InvalidInput, match="long done"):
        session.replay_of(first)


def test_bad_table_config_is_refused():
    with pytest.raises(InvalidInput):
        SessionTable(SessionConfig(idle_timeout=0))
