"""Disputes decided by a referee's recomputation, never by a vote: each side is convicted only
on what it signed (the node on its outputs, a verifier on its recomputation and its verdict)."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest
import torch

from corolla.errors import BadReceipt, InvalidInput
from corolla.node.model.span import Span, load_span
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.disputes import CheckRecord, Dispute, check_dispute, judge_dispute
from corolla.verify.evidence import StepClaim
from corolla.verify.identity import Identity
from corolla.verify.receipts import make_receipt, sign_request
from corolla.verify.tolerance import compare
from corolla.verify.verdicts import CheckVerdict, sign_verdict

START, END = 0, 2
STEPS = (5, 1, 1, 1)
THRESHOLD, FLOOR = 1e-3, 1e-4
CLIENT = Identity.generate()


@pytest.fixture(scope="module")
def span(bloom_dir: Path) -> Span:
    return load_span(bloom_dir, START, END)


def _request(span: Span, session: bytes, step: int, position: int, x: torch.Tensor) -> object:
    return sign_request(
        CLIENT,
        protocol_version=1,
        model_digest=span.model_digest,
        span_digest=span.digest,
        start=START,
        end=END,
        session_id=session,
        step=step,
        position=position,
        tokens=x.shape[0] * x.shape[1],
        input_digest=tensor_digest(x),
    )


def _serve(span: Span, node: Identity, noise: float = 0.0) -> tuple[StepClaim, ...]:
    """The node's session, step by step with its cache; ``noise`` corrupts its last step."""
    torch.manual_seed(1)
    session, chain, position, claims = secrets.token_bytes(16), GENESIS_CHAIN, 0, []
    cache = span.new_cache(1)
    for step, tokens in enumerate(STEPS):
        x = torch.randn(1, tokens, span.hidden_size)  # batch, tokens, hidden
        request = _request(span, session, step, position, x)
        y = span.forward(x, cache)
        if noise and step == len(STEPS) - 1:
            y = y + noise * y.norm(dim=-1, keepdim=True) / y.shape[-1] ** 0.5 * torch.randn_like(y)
        receipt = make_receipt(node, request, tensor_digest(y), chain)
        claims.append(StepClaim(request, receipt, x, y))
        chain, position = receipt.chain_digest, position + request.tokens
    return tuple(claims)


def _check(
    span: Span,
    claims: tuple[StepClaim, ...],
    verifier: Identity,
    *,
    output: torch.Tensor | None = None,
    passed: bool | None = None,
) -> CheckRecord:
    """A verifier's recomputation of the whole session and its signed verdict (honest unless
    ``output`` or ``passed`` is forced)."""
    prefix = torch.cat([c.input for c in claims], dim=1)
    claimed = torch.cat([c.output for c in claims], dim=1)
    recomputed = span.forward(prefix) if output is None else output
    request = _request(span, secrets.token_bytes(16), 0, 0, prefix)
    receipt = make_receipt(verifier, request, tensor_digest(recomputed), GENESIS_CHAIN)
    comparison = compare(claimed, recomputed, "fp32", THRESHOLD)
    verdict = CheckVerdict(
        verifier_key=verifier.public_key,
        client_key=CLIENT.public_key,
        node_key=claims[0].receipt.node_key,
        model_digest=span.model_digest,
        span_digest=span.digest,
        node_chain=claims[-1].receipt.chain_digest,
        recomputation_digest=receipt.digest(),
        session_id=claims[0].request.session_id,
        start=START,
        end=END,
        first_step=0,
        end_step=len(claims),
        first_position=0,
        end_position=prefix.shape[1],
        beacon_epoch=1,
        recomputed_positions=prefix.shape[1],
        profile="fp32",
        score=repr(comparison.score),
        threshold=repr(THRESHOLD),
        passed=comparison.passed if passed is None else passed,
        signature=bytes(64),
    )
    return CheckRecord(sign_verdict(verifier, verdict), request, receipt, recomputed)


def _judge(span: Span, dispute: Dispute, head=None):
    dispute = Dispute.from_bytes(dispute.to_bytes())  # what the ledger receives
    check_dispute(dispute)
    return judge_dispute(dispute, span.forward(dispute.prefix), THRESHOLD, FLOOR, head)


def test_a_verifier_lying_against_an_honest_node_is_convicted_and_the_node_is_not(span):
    node, liar = Identity.generate(), Identity.generate()
    claims = _serve(span, node)
    judgment = _judge(span, Dispute("fp32", claims, (_check(span, claims, liar, passed=False),)))
    assert not judgment.node_lied
    assert [key for key, _ in judgment.lying_verifiers] == [liar.public_key]


def test_a_verifier_whose_recomputation_is_false_is_convicted(span):
    node, liar = Identity.generate(), Identity.generate()
    claims = _serve(span, node)
    prefix = torch.cat([c.input for c in claims], dim=1)
    false = span.forward(prefix) * 1.05
    judgment = _judge(span, Dispute("fp32", claims, (_check(span, claims, liar, output=false),)))
    assert not judgment.node_lied
    assert [key for key, _ in judgment.lying_verifiers] == [liar.public_key]


def test_a_cheating_node_is_convicted_and_its_accomplice_too(span):
    node, honest, accomplice = (Identity.generate() for _ in range(3))
    claims = _serve(span, node, noise=1e-2)
    claimed = torch.cat([c.output for c in claims], dim=1)
    checks = (
        _check(span, claims, honest),  # fails, truthfully
        _check(span, claims, accomplice, output=claimed),  # "recomputes" the node's lie
        _check(span, claims, Identity.generate(), passed=True),  # honest numbers, false verdict
    )
    judgment = _judge(span, Dispute("fp32", claims, checks))
    assert judgment.node_lied
    liars = {key for key, _ in judgment.lying_verifiers}
    assert liars == {checks[1].verdict.verifier_key, checks[2].verdict.verifier_key}


def test_steering_under_the_threshold_is_caught_by_the_head_rule(span):
    node, verifier = Identity.generate(), Identity.generate()
    claims = list(_serve(span, node))
    prefix = torch.cat([c.input for c in claims], dim=1)
    reference = span.forward(prefix)

    # A readout of two tokens that nearly tie on the honest last position: a push of 5e-4 of
    # the hidden state's norm (between the floor and the threshold) flips it.
    r = reference[0, -1]
    weights = torch.randn(2, r.shape[0], generator=torch.Generator().manual_seed(3))
    direction = weights[1] - weights[0]
    bias = torch.zeros(2)
    bias[0] = float((weights[1] - weights[0]) @ r) + 1e-4 * float(r.norm() * direction.norm())

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ weights.T + bias).argmax(dim=-1)

    assert int(head(r)) == 0
    last = claims[-1]
    y = last.output.clone()
    y[0, -1] = r + 5e-4 * r.norm() * direction / direction.norm()
    receipt = make_receipt(node, last.request, tensor_digest(y), claims[-2].receipt.chain_digest)
    claims[-1] = StepClaim(last.request, receipt, last.input, y)
    claims = tuple(claims)
    score = compare(torch.cat([c.output for c in claims], 1), reference, "fp32").score
    assert FLOOR < score < THRESHOLD  # under the threshold: a plain comparison passes it
    dispute = Dispute("fp32", claims, (_check(span, claims, verifier),))
    assert not _judge(span, dispute).node_lied
    judgment = _judge(span, dispute, head)
    assert judgment.node_lied and "steering" in judgment.node_reason
    assert not judgment.lying_verifiers  # the verifier's 'passed' was true to its numbers


def test_tampered_or_inconsistent_disputes_accuse_nobody(span):
    node, verifier = Identity.generate(), Identity.generate()
    claims = _serve(span, node)
    check = _check(span, claims, verifier)
    other_chain = dataclasses.replace(check.verdict, node_chain=bytes(32))
    with pytest.raises(BadReceipt):  # the signature no longer covers the verdict
        check_dispute(Dispute("fp32", claims, (dataclasses.replace(check, verdict=other_chain),)))
    swapped = dataclasses.replace(check, output=check.output[:, :-1])
    with pytest.raises((InvalidInput, BadReceipt)):
        check_dispute(Dispute("fp32", claims, (swapped,)))
    with pytest.raises(BadReceipt):  # a gap in the node's steps
        check_dispute(Dispute("fp32", claims[1:], (check,)))
    with pytest.raises(InvalidInput):
        Dispute.from_bytes(b"\x00garbage")
