"""The referee decides disputes (checks v2) by its own recomputation, and the adversaries of
issue 13 as behaviours: a lying verifier, a colluding node with its accomplice verifier, and a
node steering the text under the threshold at the model's last block.

Claims and verdicts are made in-process by the same parts a node uses: the node's behaviour
computes and signs each step, a verifier's :class:`~corolla.node.verifier.Verifier` checks the
claims, recomputes with its session's cache and has its behaviour sign the verdict.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from corolla.errors import InvalidInput
from corolla.node.behaviour import Behaviour
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.head import read_head
from corolla.node.model.manifest import load_manifest
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.messages import CheckMessage, StepMessage
from corolla.node.referee import DEFAULT_FLOOR_RATIO, Referee
from corolla.node.sessions import SessionConfig, SessionTable
from corolla.node.verifier import Verifier
from corolla.simulations.verifier_adversaries import (
    ColludingNode,
    ColludingVerifier,
    LyingVerifier,
    Steering,
    colluding_verifier,
    lying_verifier,
    steering,
)
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.disputes import CheckRecord, Dispute, Judgment
from corolla.verify.evidence import StepClaim
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request
from corolla.verify.referee import RefereeConfig, RefereeFinding
from corolla.verify.tolerance import (
    CALIBRATION_FILE,
    Calibration,
    compare,
    save_calibrations,
    token_errors,
)
from corolla.verify.verdicts import consistent, verify_verdict
from corolla.version import PROTOCOL_VERSION

CLIENT = Identity.generate()
THRESHOLD = 1e-3  # the fp32 default (no calibration beside the test checkpoints)


def _request(span: Span, session: bytes, step: int, position: int, x: torch.Tensor):
    return sign_request(
        CLIENT,
        protocol_version=PROTOCOL_VERSION,
        model_digest=span.model_digest,
        span_digest=span.digest,
        start=span.start,
        end=span.end,
        session_id=session,
        step=step,
        position=position,
        tokens=x.shape[0] * x.shape[1],
        input_digest=tensor_digest(x),
    )


def _serve(
    span: Span, node: Identity, behaviour: Behaviour, inputs: list[torch.Tensor]
) -> tuple[StepClaim, ...]:
    """Node ``node``'s session over ``inputs``, computed and signed as its service does."""
    session, cache, chain, position = os.urandom(16), span.new_cache(1), GENESIS_CHAIN, 0
    claims = []
    for step, x in enumerate(inputs):
        request = _request(span, session, step, position, x)
        computed = behaviour.compute(request, span, x, cache)
        output = behaviour.output(step, request, x, computed)
        receipt = behaviour.sign_receipt(node, request, tensor_digest(output), chain)
        claims.append(StepClaim(request, receipt, x, behaviour.sent(step, request, output)))
        chain, position = receipt.chain_digest, position + request.tokens
    return tuple(claims)


def _verify(
    span: Span, verifier: Identity, behaviour: Behaviour, claims: tuple[StepClaim, ...]
) -> CheckRecord:
    """Verifier ``verifier``'s first check of ``claims``, as its service runs a check step."""
    session = SessionTable(SessionConfig()).open(
        os.urandom(16), CLIENT.public_key, 1, span.max_length, span
    )
    hidden = torch.cat([c.input for c in claims], dim=1)
    request = _request(span, session.session_id, 0, 0, hidden)
    check = CheckMessage(
        StepMessage(request, hidden),
        tuple(c.request for c in claims),
        tuple(c.receipt for c in claims),
        torch.cat([c.output for c in claims], dim=1),
        GENESIS_CHAIN,
        7,
        "fp32",
    )
    role = Verifier(verifier, span)
    role.admit(session, check)
    role.check_claims(check)
    computed = behaviour.compute(request, span, hidden, session.cache)
    output = behaviour.output(0, request, hidden, computed)
    receipt = behaviour.sign_receipt(verifier, request, tensor_digest(output), GENESIS_CHAIN)
    verdict = behaviour.judge(verifier, role.verdict(check, receipt, output))
    verify_verdict(verdict)
    return CheckRecord(verdict, request, receipt, output)


def _inputs(span: Span, tokens: tuple[int, ...] = (5, 1, 1, 1)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(1, n, span.hidden_size, generator=generator) for n in tokens]


def _judge(referee: Referee, dispute: Dispute) -> Judgment:
    judgment = referee.judge(Dispute.from_bytes(dispute.to_bytes()))  # what the ledger holds
    assert isinstance(judgment, Judgment), judgment
    return judgment


@pytest.fixture(scope="module")
def bloom_span(bloom_dir: Path) -> Span:
    return load_span(bloom_dir, 0, 2)


@pytest.fixture(scope="module")
def bloom_referee(bloom_dir: Path) -> Referee:
    return Referee(RefereeConfig(bloom_dir))


# --------------------------------------------------------------------------- the referee


def test_a_lying_verifier_is_convicted_and_the_honest_node_is_not(bloom_span, bloom_referee):
    node, liar = Identity.generate(), Identity.generate()
    claims = _serve(bloom_span, node, Behaviour(), _inputs(bloom_span))
    record = _verify(bloom_span, liar, LyingVerifier(), claims)
    assert not record.verdict.passed and consistent(record.verdict, THRESHOLD)
    judgment = _judge(bloom_referee, Dispute("fp32", claims, (record,)))
    assert not judgment.node_lied
    assert [key for key, _ in judgment.lying_verifiers] == [liar.public_key]


def test_a_colluding_pair_is_convicted_together_and_the_honest_verifier_is_not(
    bloom_span, bloom_referee
):
    node, accomplice, honest = (Identity.generate() for _ in range(3))
    claims = _serve(bloom_span, node, ColludingNode(seed=1234), _inputs(bloom_span))
    cover = _verify(bloom_span, accomplice, ColludingVerifier(node.public_key), claims)
    truth = _verify(bloom_span, honest, Behaviour(), claims)
    assert cover.verdict.passed and consistent(cover.verdict, THRESHOLD)  # looks fine alone
    assert not truth.verdict.passed
    judgment = _judge(bloom_referee, Dispute("fp32", claims, (cover, truth)))
    assert judgment.node_lied
    assert [key for key, _ in judgment.lying_verifiers] == [accomplice.public_key]


def test_steering_under_the_threshold_at_the_last_block_is_convicted_by_the_head_rule(
    llama_dir: Path,
):
    checkpoint = Checkpoint(llama_dir)
    last = checkpoint.num_blocks
    head = read_head(checkpoint, load_manifest(checkpoint))
    front, span = load_span(llama_dir, 0, 2), load_span(llama_dir, 2, last)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(5))
    hidden = front.forward(head.embed_tokens(ids)).clone()  # the inputs of the last span
    inputs = [hidden[:, :40], *(hidden[:, t : t + 1] for t in range(40, 48))]
    steerer = Steering(llama_dir)
    steerer.attach(span)
    node, verifier = Identity.generate(), Identity.generate()
    claims = _serve(span, node, steerer, inputs)
    claimed = torch.cat([c.output for c in claims], dim=1)
    honest = span.forward(hidden)
    with torch.inference_mode():
        changed = int((head.logits(claimed).argmax(-1) != head.logits(honest).argmax(-1)).sum())
    assert changed > 0  # the steering works: it changes tokens the user would get
    record = _verify(span, verifier, Behaviour(), claims)
    assert record.verdict.passed  # under the threshold, a plain comparison passes it
    judgment = _judge(Referee(RefereeConfig(llama_dir)), Dispute("fp32", claims, (record,)))
    assert judgment.node_lied and "steering" in judgment.node_reason
    assert not judgment.lying_verifiers  # the verifier's 'passed' was true to its numbers


def test_the_referee_applies_the_models_calibration_else_the_profile_default(
    bloom_dir: Path, tmp_path: Path, bloom_referee
):
    assert bloom_referee.rules("fp32") == (THRESHOLD, THRESHOLD / DEFAULT_FLOOR_RATIO)
    model = tmp_path / "model"
    shutil.copytree(bloom_dir, model)
    calibration = Calibration(
        model_digest=bloom_referee.model_digest,
        profile="fp32",
        checked_steps=10_000,
        honest_max=3e-6,
        honest_p999=2e-6,
        threshold_margin=4.0,
        floor_margin=1.5,
        command="test",
    )
    save_calibrations(model / CALIBRATION_FILE, [calibration])
    calibrated = Referee(RefereeConfig(model))
    assert calibrated.rules("fp32") == (calibration.threshold, calibration.honest_floor)
    assert calibrated.rules("nf4") == (THRESHOLD, THRESHOLD / DEFAULT_FLOOR_RATIO)
    elsewhere = dataclasses.replace(calibration, model_digest=bytes(32))
    save_calibrations(model / CALIBRATION_FILE, [elsewhere])
    assert Referee(RefereeConfig(model)).rules("fp32")[0] == THRESHOLD  # another model's


def test_the_referee_declines_what_it_cannot_judge(bloom_dir, llama_dir, bloom_span):
    node, verifier = Identity.generate(), Identity.generate()
    claims = _serve(bloom_span, node, Behaviour(), _inputs(bloom_span))
    dispute = Dispute("fp32", claims, (_verify(bloom_span, verifier, LyingVerifier(), claims),))
    other_model = Referee(RefereeConfig(llama_dir)).judge(dispute)
    assert isinstance(other_model, RefereeFinding) and other_model.status == "declined"
    small = Referee(RefereeConfig(bloom_dir, max_tokens=4)).judge(dispute)
    assert isinstance(small, RefereeFinding) and "at most 4" in small.note


# --------------------------------------------------------------------------- the adversaries


def test_a_colluding_node_corrupts_deterministically_by_its_shared_seed(bloom_span):
    x = _inputs(bloom_span, (4,))[0]
    request = _request(bloom_span, bytes(16), 0, 0, x)
    honest = bloom_span.forward(x)
    first, again, other = (
        ColludingNode(seed=seed).output(0, request, x, honest) for seed in (9, 9, 10)
    )
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 5e-3 < float(token_errors(first, honest).max()) < 2e-2


def test_a_colluding_verifier_passes_only_its_accomplice(bloom_span):
    verifier = Identity.generate()
    node, partner = Identity.generate(), Identity.generate()
    claims = _serve(bloom_span, node, ColludingNode(seed=2), _inputs(bloom_span, (3, 1)))
    for accomplice, passed in ((node.public_key, True), (partner.public_key, False)):
        verdict = _verify(bloom_span, verifier, ColludingVerifier(accomplice), claims).verdict
        assert verdict.passed is passed and consistent(verdict, THRESHOLD)
    assert colluding_verifier(node.public_key.hex()).accomplice == node.public_key
    for bad in (None, "zz", "ab"):
        with pytest.raises(InvalidInput):
            colluding_verifier(bad)


def test_a_lying_verifier_fails_every_node_or_only_its_target(bloom_span):
    verifier, honest_node, target = (Identity.generate() for _ in range(3))
    honest_claims = _serve(bloom_span, honest_node, Behaviour(), _inputs(bloom_span, (2, 1)))
    target_claims = _serve(bloom_span, target, Behaviour(), _inputs(bloom_span, (2, 1)))
    aimed = lying_verifier(target.public_key.hex())
    assert not _verify(bloom_span, verifier, aimed, target_claims).verdict.passed
    assert _verify(bloom_span, verifier, aimed, honest_claims).verdict.passed
    assert not _verify(bloom_span, verifier, lying_verifier(), honest_claims).verdict.passed


def test_a_steering_node_stays_under_the_threshold_and_serves_only_the_last_block(llama_dir):
    with pytest.raises(InvalidInput, match="last block"):
        Steering(llama_dir).attach(load_span(llama_dir, 0, 2))
    with pytest.raises(InvalidInput):
        steering(None)
    span = load_span(llama_dir, 2, Checkpoint(llama_dir).num_blocks)
    steerer = steering(llama_dir, token=65)
    steerer.attach(span)
    x = _inputs(span, (12,))[0]
    request = _request(span, bytes(16), 0, 0, x)
    honest = span.forward(x)
    steered = steerer.output(0, request, x, honest)
    score = compare(steered, honest, "fp32").score
    assert 0.85 * THRESHOLD < score < THRESHOLD  # 0.9 x the threshold, up to float rounding
    assert torch.equal(steerer.output(0, request, x, honest), steered)  # deterministic
