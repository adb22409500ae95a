"""The beacon, the verifier draw and the signed verdict: the records issue 13's checks rest on."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest

from corolla.errors import BadReceipt, BadSignature, InvalidInput
from corolla.verify.assignment import MAX_SKIPS, assignment_seed, rank, within_reach
from corolla.verify.beacon import Beacon, epoch_of, sign_beacon, verify_beacon
from corolla.verify.encoding import domain_digest
from corolla.verify.identity import Identity
from corolla.verify.verdicts import CheckVerdict, consistent, sign_verdict, verify_verdict

LEDGER = Identity.generate()


def _beacon(epoch: int = 7) -> Beacon:
    return sign_beacon(LEDGER, "test-ledger", 30, epoch)


def test_a_beacon_checks_against_the_ledger_key_and_nothing_else():
    beacon = _beacon()
    verify_beacon(beacon, LEDGER.public_key, "test-ledger")
    assert Beacon.from_dict(beacon.to_dict()) == beacon
    with pytest.raises(BadSignature):
        verify_beacon(beacon, Identity.generate().public_key)
    with pytest.raises(BadSignature):
        verify_beacon(beacon, LEDGER.public_key, "another-ledger")
    forged = dataclasses.replace(beacon, epoch=8)  # the old signature under a new epoch
    with pytest.raises(BadSignature):
        verify_beacon(forged, LEDGER.public_key)


def test_each_epoch_has_its_own_value_and_the_same_one_every_time():
    assert _beacon(7).value == _beacon(7).value  # deterministic: the ledger cannot re-roll
    assert len({_beacon(epoch).value for epoch in range(50)}) == 50
    assert epoch_of(59.9, 30) == 1 and epoch_of(60.0, 30) == 2


def test_malformed_beacons_are_refused():
    for bad in ({"origin": "x"}, {**_beacon().to_dict(), "epoch": -1}, [1, 2]):
        with pytest.raises(InvalidInput):
            Beacon.from_dict(bad)


def _seed(beacon: Beacon, chain: bytes = bytes(32), end_step: int = 5) -> bytes:
    return assignment_seed(beacon, bytes(range(32)), bytes(16), 0, 4, end_step, chain)


def test_the_draw_depends_on_the_beacon_and_on_every_claim_the_node_signed():
    beacon = _beacon()
    seeds = {
        _seed(beacon),
        _seed(_beacon(8)),
        _seed(beacon, chain=b"\x01" * 32),
        _seed(beacon, end_step=6),
    }
    assert len(seeds) == 4


def test_the_rank_of_two_candidates_does_not_depend_on_the_others():
    keys = [Identity.generate().public_key for _ in range(8)]
    seed = _seed(_beacon())
    full = rank(seed, keys)
    assert rank(seed, reversed(keys)) == full
    without = rank(seed, keys[1:])
    assert [key for key in full if key != keys[0]] == without


def test_the_rank_is_the_documented_digest_order():
    keys = [Identity.generate().public_key for _ in range(12)]
    seed = _seed(_beacon())
    expected = sorted(keys, key=lambda key: domain_digest("verifier-rank", seed, key))
    assert rank(seed, keys) == expected


def test_every_candidate_is_drawn_about_equally_often():
    keys = [Identity.generate().public_key for _ in range(4)]
    firsts = Counter(rank(_seed(_beacon(epoch)), keys)[0] for epoch in range(4000))
    assert set(firsts) == set(keys)
    # each share within 5 standard deviations of 1/4
    sigma = math.sqrt(4000 * 0.25 * 0.75)
    assert all(abs(count - 1000) < 5 * sigma for count in firsts.values())


def test_the_reach_skips_the_node_the_client_and_the_untrusted():
    node, client, *others = [Identity.generate().public_key for _ in range(6)]
    seed = _seed(_beacon())
    slashed = others[0]
    reach = within_reach(seed, [node, client, *others], (node, client), lambda k: k != slashed)
    assert len(reach) == MAX_SKIPS + 1
    assert not {node, client, slashed} & set(reach)
    assert reach == [k for k in rank(seed, others) if k != slashed][: MAX_SKIPS + 1]


def _verdict(verifier: Identity, **changes: object) -> CheckVerdict:
    fields: dict[str, object] = dict(
        verifier_key=verifier.public_key,
        client_key=b"\x02" * 32,
        node_key=b"\x03" * 32,
        model_digest=b"\x04" * 32,
        span_digest=b"\x05" * 32,
        node_chain=b"\x06" * 32,
        recomputation_digest=b"\x07" * 32,
        session_id=b"\x08" * 16,
        start=0,
        end=4,
        first_step=0,
        end_step=3,
        first_position=0,
        end_position=12,
        beacon_epoch=7,
        recomputed_positions=12,
        profile="fp32",
        score="2.5e-06",
        threshold="0.001",
        passed=True,
        signature=bytes(64),
    )
    fields.update(changes)
    return sign_verdict(verifier, CheckVerdict(**fields))  # type: ignore[arg-type]


def test_a_verdict_is_bound_to_its_verifier_and_to_every_field():
    verifier = Identity.generate()
    verdict = _verdict(verifier)
    verify_verdict(verdict)
    assert CheckVerdict.from_dict(verdict.to_dict()) == verdict
    for name, value in (("passed", False), ("score", "0.5"), ("end_step", 4)):
        with pytest.raises(BadReceipt):
            verify_verdict(dataclasses.replace(verdict, **{name: value}))


def test_a_verdict_must_follow_from_its_score_and_the_profiles_threshold():
    verifier = Identity.generate()
    assert consistent(_verdict(verifier), 1e-3)
    assert not consistent(_verdict(verifier, passed=False), 1e-3)  # lying against the node
    assert not consistent(_verdict(verifier, score="0.002"), 1e-3)  # lying for it
    assert consistent(_verdict(verifier, score="0.002", passed=False), 1e-3)
    assert not consistent(_verdict(verifier, score="nan"), 1e-3)
    assert not consistent(_verdict(verifier, threshold="0.01", score="0.002"), 1e-3)


def test_a_verifier_cannot_judge_its_own_work():
    verifier = Identity.generate()
    with pytest.raises(InvalidInput):
        _verdict(verifier, node_key=verifier.public_key)
    with pytest.raises(InvalidInput):
        _verdict(verifier, first_step=3)
