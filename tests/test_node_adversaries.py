"""Adversary behaviours: each misbehaves in its own way, and receipt checks catch the first two."""

from __future__ import annotations

import os

import pytest
import torch

from corolla import PROTOCOL_VERSION
from corolla.errors import BadReceipt, BadSignature, InvalidInput
from corolla.node.service import Behaviour
from corolla.simulations.adversaries import ADVERSARIES, make_behaviour
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import sign_request, verify_receipt

NODE = Identity.generate()
CLIENT = Identity.generate()


def _serve(behaviour: Behaviour, hidden: torch.Tensor, honest: torch.Tensor):
    """What the service does with a behaviour, minus the network: (request, receipt, sent)."""
    request = sign_request(
        CLIENT,
        protocol_version=PROTOCOL_VERSION,
        model_digest=bytes(32),
        span_digest=bytes(32),
        start=0,
        end=2,
        session_id=os.urandom(16),
        step=0,
        position=0,
        tokens=hidden.shape[0] * hidden.shape[1],
        input_digest=tensor_digest(hidden),
    )
    output = behaviour.output(0, request, hidden, honest)
    receipt = behaviour.sign_receipt(NODE, request, tensor_digest(output), GENESIS_CHAIN)
    return request, receipt, behaviour.sent(0, request, output)


def _check(request, receipt, sent):
    verify_receipt(
        receipt,
        request=request,
        output=sent,
        previous_chain=GENESIS_CHAIN,
        node_key=NODE.public_key,
    )


HIDDEN = torch.randn(1, 4, 16)
HONEST = torch.randn(1, 4, 16)


def test_honest_behaviour_passes_receipt_checks_with_the_honest_output():
    request, receipt, sent = _serve(make_behaviour("honest"), HIDDEN, HONEST)
    _check(request, receipt, sent)
    assert torch.equal(sent, HONEST)


def test_wrong_key_adversary_fails_the_signature_check():
    request, receipt, sent = _serve(make_behaviour("wrong-key"), HIDDEN, HONEST)
    assert torch.equal(sent, HONEST) and receipt.node_key != NODE.public_key
    with pytest.raises(BadSignature):
        _check(request, receipt, sent)


def test_bad_digest_adversary_fails_the_output_check():
    request, receipt, sent = _serve(make_behaviour("bad-digest"), HIDDEN, HONEST)
    assert receipt.output_digest == tensor_digest(HONEST) and not torch.equal(sent, HONEST)
    with pytest.raises(BadReceipt, match="another output"):
        _check(request, receipt, sent)


@pytest.mark.parametrize("name", ["noise", "lazy"])
def test_consistent_liars_pass_receipt_checks_but_send_wrong_outputs(name):
    request, receipt, sent = _serve(make_behaviour(name), HIDDEN, HONEST)
    _check(request, receipt, sent)  # only a spot-check (recomputation) can catch these
    assert not torch.allclose(sent, HONEST, atol=1e-3)
    if name == "lazy":
        assert torch.equal(sent, HIDDEN)


def test_every_listed_adversary_can_be_made_and_unknown_names_are_refused():
    assert {make_behaviour(name).name for name in ADVERSARIES} == set(ADVERSARIES)
    with pytest.raises(InvalidInput, match="unknown adversary"):
        make_behaviour("gremlin")
