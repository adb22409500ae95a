"""Adversary behaviours: each misbehaves exactly when and how it says, and signs what it sends
(except the two liars that receipt checks exist to catch)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from swarm_fixtures import Swarm

from corolla.errors import BadReceipt, BadSignature, CorollaError, InvalidInput, NodeUnavailable
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import Manifest, load_manifest
from corolla.node.model.span import Span, load_span
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.node.protocol.messages import OpenSession, StepMessage
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.records import RecordValidator, fetch_records
from corolla.node.protocol.stream import InferenceStream, request_forward, request_info
from corolla.node.service import Behaviour, NodeService
from corolla.simulations.adversaries import (
    ADVERSARIES,
    AdversaryOptions,
    Hang,
    Selective,
    WrongModel,
    WrongQuant,
    make_behaviour,
)
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import Identity
from corolla.verify.receipts import StepRequest, sign_request, verify_receipt
from corolla.verify.tolerance import compare, token_errors
from corolla.version import PROTOCOL_VERSION

NODE = Identity.generate()
CLIENT = Identity.generate()
HIDDEN = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1))
HONEST = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(2))


def _request(
    hidden: torch.Tensor,
    *,
    client: Identity = CLIENT,
    session_id: bytes | None = None,
    step: int = 0,
    position: int = 0,
    blocks: tuple[int, int] = (0, 2),
    manifest: Manifest | None = None,
) -> StepRequest:
    return sign_request(
        client,
        protocol_version=PROTOCOL_VERSION,
        model_digest=manifest.model_digest if manifest is not None else bytes(32),
        span_digest=manifest.span_digest(*blocks) if manifest is not None else bytes(32),
        start=blocks[0],
        end=blocks[1],
        session_id=session_id or os.urandom(16),
        step=step,
        position=position,
        tokens=hidden.shape[0] * hidden.shape[1],
        input_digest=tensor_digest(hidden),
    )


def _serve(behaviour: Behaviour, request: StepRequest, hidden: torch.Tensor, honest: torch.Tensor):
    """What the service does after its forward pass, minus the network: (receipt, sent)."""
    output = behaviour.output(request.step, request, hidden, honest)
    receipt = behaviour.sign_receipt(NODE, request, tensor_digest(output), GENESIS_CHAIN)
    return receipt, behaviour.sent(request.step, request, output)


def _check(request, receipt, sent):
    verify_receipt(
        receipt,
        request=request,
        output=sent,
        previous_chain=GENESIS_CHAIN,
        node_key=NODE.public_key,
    )


def _score(claimed: torch.Tensor, honest: torch.Tensor) -> float:
    return float(token_errors(claimed, honest).max())


# --------------------------------------------------------------------------- tensor-only strategies


def test_honest_behaviour_passes_receipt_checks_with_the_honest_output():
    request = _request(HIDDEN)
    receipt, sent = _serve(make_behaviour("honest"), request, HIDDEN, HONEST)
    _check(request, receipt, sent)
    assert torch.equal(sent, HONEST)


def test_wrong_key_adversary_fails_the_signature_check():
    request = _request(HIDDEN)
    receipt, sent = _serve(make_behaviour("wrong-key"), request, HIDDEN, HONEST)
    assert torch.equal(sent, HONEST) and receipt.node_key != NODE.public_key
    with pytest.raises(BadSignature):
        _check(request, receipt, sent)


def test_bad_digest_adversary_fails_the_output_check():
    request = _request(HIDDEN)
    receipt, sent = _serve(make_behaviour("bad-digest"), request, HIDDEN, HONEST)
    assert receipt.output_digest == tensor_digest(HONEST) and not torch.equal(sent, HONEST)
    with pytest.raises(BadReceipt, match="another output"):
        _check(request, receipt, sent)


@pytest.mark.parametrize("name", ["noise", "subtle", "lazy"])
def test_consistent_liars_pass_receipt_checks_but_fail_the_spot_check_comparison(name):
    request = _request(HIDDEN)
    receipt, sent = _serve(make_behaviour(name), request, HIDDEN, HONEST)
    _check(request, receipt, sent)  # only a spot-check (recomputation) can catch these
    assert not compare(sent, HONEST, "fp32").passed
    if name == "lazy":
        assert torch.equal(sent, HIDDEN)


@pytest.mark.parametrize("size", [1e-4, 3e-3, 1e-2, 0.5])
def test_perturbation_size_is_relative_to_each_tokens_rms(size):
    """The spot-check score of a perturbed token is about the perturbation asked for."""
    honest = torch.randn(2, 8, 256) * torch.logspace(-2, 2, 8).reshape(1, 8, 1)
    request = _request(honest)
    receipt, sent = _serve(
        make_behaviour("subtle", AdversaryOptions(perturbation=size)), request, honest, honest
    )
    _check(request, receipt, sent)
    scores = token_errors(sent, honest)
    assert float(scores.min()) > 0.75 * size and float(scores.max()) < 1.3 * size
    assert compare(sent, honest, "fp32").passed == (size < 1e-3)


def test_noise_is_deterministic_given_the_seed_session_and_step():
    request, other_step = _request(HIDDEN, step=0), _request(HIDDEN, step=1)

    def sent(seed: int, req: StepRequest) -> torch.Tensor:
        behaviour = make_behaviour("noise", AdversaryOptions(seed=seed))
        return _serve(behaviour, req, HIDDEN, HONEST)[1]

    assert torch.equal(sent(7, request), sent(7, request))
    assert not torch.equal(sent(7, request), sent(8, request))
    assert not torch.equal(sent(7, request), sent(7, other_step))


def test_selective_cheats_on_the_requested_fraction_of_steps_and_only_on_those():
    fraction, sessions, steps = 0.3, 100, 30
    behaviour = make_behaviour(
        "selective", AdversaryOptions(cheat_with="noise", cheat_fraction=fraction, seed=5)
    )
    noise = make_behaviour("noise", AdversaryOptions(seed=5))
    cheated = 0
    for _ in range(sessions):
        session_id = os.urandom(16)
        for step in range(steps):
            request = _request(HIDDEN, session_id=session_id, step=step)
            receipt, sent = _serve(behaviour, request, HIDDEN, HONEST)
            _check(request, receipt, sent)
            if torch.equal(sent, HONEST):
                continue
            cheated += 1
            assert torch.equal(sent, _serve(noise, request, HIDDEN, HONEST)[1])
    share = cheated / (sessions * steps)
    assert abs(share - fraction) < 0.04  # 3000 draws: 0.04 is about 5 standard deviations


def test_selective_with_a_target_client_cheats_on_that_client_only():
    victim, bystander = Identity.generate(), Identity.generate()
    options = AdversaryOptions(cheat_with="lazy", target_client=victim.public_key.hex()[:6])
    behaviour = make_behaviour("selective", options)
    for step in range(20):
        for client in (victim, bystander):
            request = _request(HIDDEN, client=client, step=step)
            receipt, sent = _serve(behaviour, request, HIDDEN, HONEST)
            _check(request, receipt, sent)
            assert torch.equal(sent, HIDDEN if client is victim else HONEST)


def test_selective_can_wrap_a_receipt_liar_and_lies_only_on_its_steps():
    behaviour = Selective(make_behaviour("wrong-key"), fraction=0.5, seed=1)
    outcomes = set()
    for step in range(40):
        request = _request(HIDDEN, step=step)
        receipt, sent = _serve(behaviour, request, HIDDEN, HONEST)
        try:
            _check(request, receipt, sent)
            outcomes.add(("honest", behaviour.cheats_on(request)))
        except BadSignature:
            outcomes.add(("lied", behaviour.cheats_on(request)))
    assert outcomes == {("honest", False), ("lied", True)}


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("gremlin", AdversaryOptions(), "unknown adversary"),
        ("lazy", AdversaryOptions(perturbation=0.1), "--perturbation does not apply"),
        ("noise", AdversaryOptions(cheat_fraction=0.5), "--cheat-fraction does not apply"),
        ("selective", AdversaryOptions(), "needs --cheat-fraction"),
        ("selective", AdversaryOptions(cheat_fraction=1.5), r"\[0, 1\]"),
        ("selective", AdversaryOptions(target_client="xyz"), "hex prefix"),
        ("selective", AdversaryOptions(cheat_with="selective", cheat_fraction=0.5), "another"),
        ("wrong-model", AdversaryOptions(), "needs --wrong-model"),
        ("wrong-model", AdversaryOptions(wrong_model=Path("/nonexistent")), "not a directory"),
        ("wrong-quant", AdversaryOptions(wrong_quant="none"), "nf4 or int8"),
        ("subtle", AdversaryOptions(perturbation=-1.0), "positive"),
    ],
)
def test_bad_adversary_options_are_refused_with_a_clear_reason(name, options, message):
    with pytest.raises(CorollaError, match=message):  # InvalidInput, CheckpointError
        make_behaviour(name, options)


def test_every_listed_adversary_can_be_made(llama_dir):
    options = {
        "wrong-model": AdversaryOptions(wrong_model=llama_dir),
        "selective": AdversaryOptions(cheat_fraction=0.5),
        "colluding-verifier": AdversaryOptions(accomplice="ab" * 32),
        "steering": AdversaryOptions(steer_model=llama_dir),
    }
    made = {make_behaviour(name, options.get(name)).name for name in ADVERSARIES}
    assert made == set(ADVERSARIES)


# --------------------------------------------------------------------------- substituted weights


@pytest.fixture(scope="module")
def other_bloom_dir(tmp_path_factory) -> Path:
    """The test BLOOM's architecture with other weights (another seed)."""
    tiny = TinyModelConfig(
        family="bloom", num_layers=4, hidden_size=64, num_heads=4, seed=3, initializer_range=0.3
    )
    return create_tiny_model(tmp_path_factory.mktemp("other") / "bloom", tiny)


@pytest.fixture(scope="module")
def span(bloom_dir) -> Span:
    return load_span(bloom_dir, 0, 4)


def _session_outputs(behaviour: Behaviour, span: Span, blocks: tuple[int, int], inputs):
    """Run ``inputs`` (a prefill, then single tokens) through a session on ``blocks``."""
    part = span.subspan(*blocks)
    cache = part.new_cache(1)
    outputs, session_id, position = [], os.urandom(16), 0
    for step, hidden in enumerate(inputs):
        request = _request(
            hidden,
            session_id=session_id,
            step=step,
            position=position,
            blocks=blocks,
            manifest=span.manifest,
        )
        computed = behaviour.compute(request, part, hidden, cache)
        outputs.append(behaviour.output(step, request, hidden, computed))
        position += hidden.shape[1]
    return outputs


def _inputs(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    sizes = [5] + [1] * (count - 1)
    return [torch.randn(1, n, 64, generator=generator) for n in sizes]


@pytest.mark.parametrize("blocks", [(0, 4), (1, 3)])
def test_wrong_model_computes_with_the_other_checkpoints_weights(span, other_bloom_dir, blocks):
    behaviour = make_behaviour("wrong-model", AdversaryOptions(wrong_model=other_bloom_dir))
    behaviour.attach(span)
    cheats = _session_outputs(behaviour, span, blocks, _inputs())
    honest = _session_outputs(Behaviour(), span, blocks, _inputs())
    other = _session_outputs(Behaviour(), load_span(other_bloom_dir, 0, 4), blocks, _inputs())
    for cheat, right, wrong in zip(cheats, honest, other, strict=True):
        assert torch.equal(cheat, wrong)
        assert _score(cheat, right) > 1e-1


def test_wrong_model_refuses_the_nodes_own_weights_or_another_architecture(
    span, bloom_dir, llama_dir
):
    with pytest.raises(InvalidInput, match="own weights"):
        WrongModel(bloom_dir).attach(span)
    with pytest.raises(InvalidInput, match="llama"):
        WrongModel(llama_dir).attach(span)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_wrong_quant_computes_what_a_quantized_node_computes(span, bloom_dir, quant):
    behaviour = make_behaviour("wrong-quant", AdversaryOptions(wrong_quant=quant))
    behaviour.attach(span)
    cheats = _session_outputs(behaviour, span, (0, 4), _inputs())
    honest = _session_outputs(Behaviour(), span, (0, 4), _inputs())
    quantized = load_span(bloom_dir, 0, 4, quant)
    reference = _session_outputs(Behaviour(), quantized, (0, 4), _inputs())
    for cheat, right, same in zip(cheats, honest, reference, strict=True):
        assert torch.equal(cheat, same)
        assert not compare(cheat, right, "fp32").passed


def test_wrong_quant_needs_an_unquantized_node(bloom_dir):
    with pytest.raises(InvalidInput, match="--quant none"):
        WrongQuant("nf4").attach(load_span(bloom_dir, 0, 1, "int8"))


def test_selective_wrong_model_keeps_the_session_running_on_honest_steps(span, other_bloom_dir):
    inner = make_behaviour("wrong-model", AdversaryOptions(wrong_model=other_bloom_dir))
    behaviour = Selective(inner, fraction=0.5, seed=2)
    behaviour.attach(span)
    outputs = _session_outputs(behaviour, span, (0, 4), _inputs(8))
    assert all(torch.isfinite(output).all() for output in outputs)


# --------------------------------------------------------------------------- a hanging node


async def _until(condition, timeout: float = 60.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.timeout(180)
@pytest.mark.asyncio(loop_scope="module")
async def test_hang_answers_its_first_steps_then_accepts_the_next_and_never_answers(daemons, span):
    server, peer = daemons
    behaviour = Hang(answered=2)
    service = NodeService(span, NODE, behaviour=behaviour)
    await service.add_handlers(server)
    stream = InferenceStream(peer, server.peer_id)
    session_id, position, cache = os.urandom(16), 0, span.new_cache(1)
    try:
        await stream.open(OpenSession(session_id, 1, 32, 0, 4, CLIENT.public_key), timeout=30)
        for step, hidden in enumerate(_inputs(3)):
            request = _request(
                hidden,
                session_id=session_id,
                step=step,
                position=position,
                blocks=(0, 4),
                manifest=span.manifest,
            )
            position += hidden.shape[1]
            if step < 2:
                reply = await stream.step(StepMessage(request, hidden), timeout=30)
                assert torch.equal(reply.hidden, span.forward(hidden, cache))
                continue
            with pytest.raises(NodeUnavailable, match="did not answer within"):
                await stream.step(StepMessage(request, hidden), timeout=2)
        assert await _until(lambda: behaviour.held == 1), "the third step never reached compute"
        # Held, not refused or lost: a one-shot forward waits behind it as well.
        hidden = _inputs(1)[0]
        forward = StepMessage(_request(hidden, blocks=(0, 4), manifest=span.manifest), hidden)
        with pytest.raises(NodeUnavailable, match="did not answer"):
            await request_forward(peer, server.peer_id, forward, timeout=2)
        assert behaviour.held == 1
    finally:
        behaviour.release()
        await stream.abort()
        await service.remove_handlers(server)
        service.shutdown()


# --------------------------------------------------------------------------- a real process


def _reader(initial_peers: list[str]) -> DHT:
    return DHT(
        **p2p_options(),
        initial_peers=initial_peers,
        start=True,
        client_mode=True,
        record_validators=[RecordValidator()],
    )


@pytest.mark.timeout(240)
async def test_simulated_wrong_quant_node_announces_fp32_but_computes_nf4(bloom_dir, tmp_path):
    manifest = load_manifest(Checkpoint(bloom_dir))
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(9))
    with Swarm(tmp_path / "swarm") as swarm:
        honest = swarm.start(bloom_dir, blocks="0:4")
        cheater = swarm.start(bloom_dir, blocks="0:4", adversary="wrong-quant")
        assert "simulated adversary: wrong-quant (computes with nf4" in cheater.output
        dht = await asyncio.to_thread(_reader, swarm.initial_peers)
        try:
            p2p = await dht.replicate_p2p()
            records = {}
            for _ in range(80):
                records = (await fetch_records(dht, manifest.model_digest, 4))[0]
                if cheater.peer_id in records:
                    break
                await asyncio.sleep(0.25)
            record = records[cheater.peer_id]
            info = await request_info(p2p, PeerID.from_base58(cheater.peer_id))
            outputs = {}
            for node in (honest, cheater):
                request = _request(hidden, blocks=(0, 4), manifest=manifest)
                reply = await request_forward(
                    p2p, PeerID.from_base58(node.peer_id), StepMessage(request, hidden)
                )
                verify_receipt(
                    reply.receipt,
                    request=request,
                    output=reply.hidden,
                    previous_chain=GENESIS_CHAIN,
                    node_key=reply.receipt.node_key,
                )
                outputs[node.peer_id] = reply.hidden
            await p2p.shutdown()
        finally:
            await asyncio.to_thread(dht.shutdown)
    assert (record.quant, record.dtype) == ("none", "float32")
    assert (info.quant, info.dtype) == ("none", "float32")
    nf4 = load_span(bloom_dir, 0, 4, "nf4").forward(hidden)
    fp32 = load_span(bloom_dir, 0, 4).forward(hidden)
    assert _score(outputs[honest.peer_id], fp32) < 1e-4
    assert _score(outputs[cheater.peer_id], fp32) > 1e-3
    assert _score(outputs[cheater.peer_id], nf4) < 1e-4
