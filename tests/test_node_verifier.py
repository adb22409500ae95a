"""The node as a verifier, over real hivemind daemons: check steps on a check session.

Node N (a :class:`NodeService`, honest or noisy) serves blocks 0:2 of the tiny BLOOM on one
daemon, verifier V (another :class:`NodeService`) on a second; the client drives N's session
from a third, then sends V check steps carrying N's signed claims. V's verdicts must verify,
follow from their scores, fit what a dispute needs, and cover only what V newly computed; a bad
check is refused with a typed error and V's stream still serves a good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from hivemind.p2p import P2P

from corolla.errors import InvalidInput, RemoteError
from corolla.node.behaviour import Behaviour
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.messages import (
    MAX_CHECK_STEPS,
    CheckMessage,
    CheckOutput,
    OpenSession,
    StepMessage,
)
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.stream import InferenceStream
from corolla.node.protocol.tensors import Message, WireLimits
from corolla.node.service import NodeService
from corolla.node.verifier import read_calibrations
from corolla.simulations.adversaries import Noise
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.disputes import CheckRecord, Dispute, check_dispute
from corolla.verify.encoding import canonical
from corolla.verify.evidence import StepClaim
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, make_receipt, sign_request, verify_receipt
from corolla.verify.tolerance import CALIBRATION_FILE, Calibration, compare, save_calibrations
from corolla.verify.verdicts import consistent, verify_verdict
from corolla.version import PROTOCOL_VERSION

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 60.0
THRESHOLD = 1e-3  # the fp32 default: no calibration beside the test checkpoint


@pytest.fixture(scope="module")
def span(bloom_dir: Path) -> Span:
    return load_span(bloom_dir, 0, 2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trio() -> AsyncIterator[tuple[P2P, P2P, P2P]]:
    """(node N's daemon, verifier V's daemon, the client's daemon, which knows both)."""
    node = await P2P.create(**p2p_options())
    try:
        verifier = await P2P.create(**p2p_options())
        try:
            known = [*await node.get_visible_maddrs(), *await verifier.get_visible_maddrs()]
            client = await P2P.create(**p2p_options(), initial_peers=known)
            try:
                yield node, verifier, client
            finally:
                await client.shutdown()
        finally:
            await verifier.shutdown()
    finally:
        await node.shutdown()


@contextlib.asynccontextmanager
async def serving(p2p: P2P, span: Span, behaviour: Behaviour | None = None, calibrations=None):
    service = NodeService(span, Identity.generate(), behaviour=behaviour, calibrations=calibrations)
    await service.add_handlers(p2p)
    try:
        yield service
    finally:
        await service.remove_handlers(p2p)
        service.shutdown()


@contextlib.asynccontextmanager
async def stream_to(client: P2P, server: P2P, opening: OpenSession):
    stream = InferenceStream(client, server.peer_id)
    try:
        await stream.open(opening, TIMEOUT)
        yield stream
    finally:
        await stream.close()


class Client:
    """One client: drives N's session, keeps N's signed claims, and asks V to check them."""

    def __init__(self, span: Span, identity: Identity | None = None, batch: int = 1) -> None:
        self.span = span
        self.batch = batch
        self.identity = identity or Identity.generate()
        self.generator = torch.Generator().manual_seed(7)
        self.claims: list[StepClaim] = []
        self.node_session = os.urandom(16)
        self.check_session = os.urandom(16)
        self.check_step = 0
        self.checked = 0  # N's steps V has covered

    def opening(self, session_id: bytes, span: Span | None = None) -> OpenSession:
        span = span or self.span
        return OpenSession(
            session_id, self.batch, 64, span.start, span.end, self.identity.public_key
        )

    def request(self, session_id: bytes, step: int, position: int, x: torch.Tensor, **changes):
        fields = dict(
            protocol_version=PROTOCOL_VERSION,
            model_digest=self.span.model_digest,
            span_digest=self.span.digest,
            start=self.span.start,
            end=self.span.end,
            session_id=session_id,
            step=step,
            position=position,
            tokens=x.shape[0] * x.shape[1],
            input_digest=tensor_digest(x),
        )
        fields.update(changes)
        return sign_request(fields.pop("signer", self.identity), **fields)

    async def serve(self, stream: InferenceStream, node_key: bytes, tokens: list[int]) -> None:
        """Steps of N's session, each receipt checked as a client would."""
        for count in tokens:
            shape = (self.batch, count, self.span.hidden_size)
            x = torch.randn(shape, generator=self.generator)
            position = sum(c.request.tokens for c in self.claims)
            request = self.request(self.node_session, len(self.claims), position, x)
            output = await stream.step(StepMessage(request, x), TIMEOUT)
            previous = self.claims[-1].receipt.chain_digest if self.claims else GENESIS_CHAIN
            verify_receipt(
                output.receipt,
                request=request,
                output=output.hidden,
                previous_chain=previous,
                node_key=node_key,
            )
            self.claims.append(StepClaim(request, output.receipt, x, output.hidden))

    def check(self, **changes) -> CheckMessage:
        """A check of N's steps V has not covered yet (``changes`` damage it)."""
        covered = changes.pop("covered", self.claims[self.checked :])
        hidden = changes.pop("hidden", torch.cat([c.input for c in covered], dim=1))
        previous = (
            self.claims[self.checked - 1].receipt.chain_digest if self.checked else GENESIS_CHAIN
        )
        damage = changes.pop("request", {})
        position = damage.pop("position", covered[0].request.position)
        request = self.request(self.check_session, self.check_step, position, hidden, **damage)
        fields = dict(
            step=StepMessage(request, hidden),
            node_requests=tuple(c.request for c in covered),
            node_receipts=tuple(c.receipt for c in covered),
            claimed=torch.cat([c.output for c in covered], dim=1),
            previous_chain=previous,
            beacon_epoch=42,
            profile="fp32",
        )
        fields.update(changes)
        return CheckMessage(**fields)

    async def send_check(self, stream: InferenceStream, check: CheckMessage) -> CheckOutput:
        output = await stream.check(check, TIMEOUT)
        self.check_step += 1
        self.checked = check.node_requests[-1].step + 1
        return output


def _check_output(check: CheckMessage, output: CheckOutput, verifier_key: bytes, previous: bytes):
    """What every client checks of V's answer."""
    verify_verdict(output.verdict)
    verify_receipt(
        output.receipt,
        request=check.request,
        output=output.hidden,
        previous_chain=previous,
        node_key=verifier_key,
    )
    verdict = output.verdict
    assert consistent(verdict, THRESHOLD)
    assert verdict.recomputation_digest == output.receipt.digest()
    assert verdict.node_chain == check.node_receipts[-1].chain_digest
    assert verdict.recomputed_positions == check.request.tokens
    assert verdict.beacon_epoch == 42


async def test_a_check_of_honest_claims_passes_with_a_verdict_a_dispute_accepts(trio, span):
    node_p2p, verifier_p2p, client_p2p = trio
    async with serving(node_p2p, span) as node, serving(verifier_p2p, span) as verifier:
        client = Client(span)
        async with stream_to(client_p2p, node_p2p, client.opening(client.node_session)) as n:
            await client.serve(n, node.identity.public_key, [5, 1, 1])
        opening = client.opening(client.check_session)
        async with stream_to(client_p2p, verifier_p2p, opening) as v:
            check = client.check()
            output = await client.send_check(v, check)
    _check_output(check, output, verifier.identity.public_key, GENESIS_CHAIN)
    verdict = output.verdict
    assert verdict.passed and float(verdict.score) <= THRESHOLD
    assert (verdict.first_step, verdict.end_step) == (0, 3)
    assert (verdict.first_position, verdict.end_position, verdict.recomputed_positions) == (0, 7, 7)
    assert (verdict.node_key, verdict.client_key) == (
        node.identity.public_key,
        client.identity.public_key,
    )
    assert verdict.session_id == client.node_session
    record = CheckRecord(verdict, check.request, output.receipt, output.hidden)
    check_dispute(Dispute("fp32", tuple(client.claims), (record,)))  # the ledger could judge it


async def test_a_check_of_claims_with_noise_of_1e_2_fails(trio, span):
    node_p2p, verifier_p2p, client_p2p = trio
    noisy = Noise(perturbation=1e-2, seed=3)
    async with serving(node_p2p, span, noisy) as node, serving(verifier_p2p, span) as verifier:
        client = Client(span)
        async with stream_to(client_p2p, node_p2p, client.opening(client.node_session)) as n:
            await client.serve(n, node.identity.public_key, [4, 1])
        opening = client.opening(client.check_session)
        async with stream_to(client_p2p, verifier_p2p, opening) as v:
            check = client.check()
            output = await client.send_check(v, check)
    _check_output(check, output, verifier.identity.public_key, GENESIS_CHAIN)
    assert not output.verdict.passed
    assert 3e-3 < float(output.verdict.score) < 3e-2


async def test_a_second_check_computes_only_the_new_positions_and_matches_a_one_shot_recomputation(
    trio, span
):
    node_p2p, verifier_p2p, client_p2p = trio
    async with serving(node_p2p, span) as node, serving(verifier_p2p, span) as verifier:
        client = Client(span)
        key = node.identity.public_key
        opening = client.opening(client.check_session)
        async with (
            stream_to(client_p2p, node_p2p, client.opening(client.node_session)) as n,
            stream_to(client_p2p, verifier_p2p, opening) as v,
        ):
            await client.serve(n, key, [6, 1])
            first_check = client.check()
            first = await client.send_check(v, first_check)
            await client.serve(n, key, [1, 1, 1])
            second_check = client.check()
            second = await client.send_check(v, second_check)
    _check_output(first_check, first, verifier.identity.public_key, GENESIS_CHAIN)
    _check_output(second_check, second, verifier.identity.public_key, first.receipt.chain_digest)
    verdict = second.verdict
    assert verdict.passed
    assert (verdict.first_step, verdict.end_step) == (2, 5)
    assert (verdict.first_position, verdict.end_position) == (7, 10)
    assert verdict.recomputed_positions == 3  # not the whole prefix of 10
    prefix = torch.cat([c.input for c in client.claims], dim=1)
    cached = torch.cat([first.hidden, second.hidden], dim=1)
    assert compare(cached, span.forward(prefix), "fp32").passed
    records = tuple(
        CheckRecord(o.verdict, c.request, o.receipt, o.hidden)
        for c, o in ((first_check, first), (second_check, second))
    )
    check_dispute(Dispute("fp32", tuple(client.claims), records))


async def test_bad_checks_are_refused_with_typed_errors_and_the_stream_still_checks(trio, span):
    node_p2p, verifier_p2p, client_p2p = trio
    async with serving(node_p2p, span) as node, serving(verifier_p2p, span):
        client = Client(span)
        async with stream_to(client_p2p, node_p2p, client.opening(client.node_session)) as n:
            await client.serve(n, node.identity.public_key, [3, 1, 1])
        claims = client.claims
        forger = Identity.generate()
        forged = make_receipt(forger, claims[1].request, tensor_digest(claims[1].output),
                              claims[0].receipt.chain_digest)  # fmt: skip
        unsigned = dataclasses.replace(claims[1].receipt, signature=bytes(64))
        other_client = Client(span)
        others = other_client.request(client.node_session, 0, 0, claims[0].input)
        wrong_inputs = torch.cat([c.input for c in claims], dim=1) + 1e-3
        bad = {
            "by another key": (
                client.check(node_receipts=_swap(claims, 1, forged)),
                "another node",
            ),
            "not signed by N": (client.check(node_receipts=_swap(claims, 1, unsigned)), "unverif"),
            "not N's inputs": (client.check(hidden=wrong_inputs), "not the node's inputs"),
            "another client": (
                client.check(node_requests=(others, *[c.request for c in claims[1:]])),
                "another client",
            ),
            "another profile": (client.check(profile="nf4"), "profile"),
            "not from step 0": (
                client.check(covered=claims[1:], request=dict(position=0)),
                "from step 0",
            ),
            "claims of another shape": (
                client.check(claimed=torch.cat([c.output for c in claims], dim=1)[:, :-1]),
                "not shaped",
            ),
        }
        opening = client.opening(client.check_session)
        async with stream_to(client_p2p, verifier_p2p, opening) as v:
            for name, (check, text) in bad.items():
                with pytest.raises(RemoteError, match=text):
                    await v.check(check, TIMEOUT)
                assert v.alive, name
            output = await client.send_check(v, client.check())
            assert output.verdict.passed
            plain = client.request(client.check_session, client.check_step, 5, claims[0].input)
            with pytest.raises(RemoteError, match="only check steps"):
                await v.step(StepMessage(plain, claims[0].input), TIMEOUT)
            again = client.check(covered=claims[2:], request=dict(position=5))
            again = dataclasses.replace(again, previous_chain=claims[1].receipt.chain_digest)
            with pytest.raises(RemoteError, match="resumes at the node's step 3"):
                await v.check(again, TIMEOUT)
        other_span = span.subspan(1, 2)
        client.check_session, client.check_step, client.checked = os.urandom(16), 0, 0
        opening = client.opening(client.check_session, other_span)
        async with stream_to(client_p2p, verifier_p2p, opening) as v:
            check = client.check(request=dict(start=1, end=2, span_digest=other_span.digest))
            with pytest.raises(RemoteError, match="other blocks"):
                await v.check(check, TIMEOUT)
            assert v.alive


async def test_a_batched_session_is_checked_in_request_units(trio, span):
    node_p2p, verifier_p2p, client_p2p = trio
    async with serving(node_p2p, span) as node, serving(verifier_p2p, span) as verifier:
        client = Client(span, batch=2)
        opening = client.opening(client.check_session)
        async with (
            stream_to(client_p2p, node_p2p, client.opening(client.node_session)) as n,
            stream_to(client_p2p, verifier_p2p, opening) as v,
        ):
            await client.serve(n, node.identity.public_key, [3, 1])
            first_check = client.check()
            first = await client.send_check(v, first_check)
            await client.serve(n, node.identity.public_key, [1])
            second_check = client.check()
            second = await client.send_check(v, second_check)
    _check_output(second_check, second, verifier.identity.public_key, first.receipt.chain_digest)
    assert first.verdict.passed and second.verdict.passed
    assert (first.verdict.first_position, first.verdict.end_position) == (0, 8)
    assert (second.verdict.first_position, second.verdict.end_position) == (8, 10)
    assert second.verdict.recomputed_positions == 2
    records = tuple(
        CheckRecord(o.verdict, c.request, o.receipt, o.hidden)
        for c, o in ((first_check, first), (second_check, second))
    )
    check_dispute(Dispute("fp32", tuple(client.claims), records))


async def test_a_calibrated_threshold_is_the_one_the_verdict_applies(trio, span, tmp_path):
    node_p2p, verifier_p2p, client_p2p = trio
    calibration = Calibration(
        model_digest=span.model_digest,
        profile="fp32",
        checked_steps=10_000,
        honest_max=2e-6,
        honest_p999=1.5e-6,
        threshold_margin=5.0,
        floor_margin=2.0,
        command="test",
    )
    save_calibrations(tmp_path / CALIBRATION_FILE, [calibration])
    found = read_calibrations(tmp_path, span.model_digest)
    assert read_calibrations(tmp_path, bytes(32)) == {}  # measured on another model: defaults
    noisy = Noise(perturbation=1e-4, seed=1)  # under the default 1e-3, over the calibrated 1e-5
    async with (
        serving(node_p2p, span, noisy) as node,
        serving(verifier_p2p, span, calibrations=found) as verifier,
    ):
        client = Client(span)
        async with stream_to(client_p2p, node_p2p, client.opening(client.node_session)) as n:
            await client.serve(n, node.identity.public_key, [3])
        opening = client.opening(client.check_session)
        async with stream_to(client_p2p, verifier_p2p, opening) as v:
            output = await client.send_check(v, client.check())
    assert verifier.verifier.threshold == calibration.threshold
    assert consistent(output.verdict, calibration.threshold)
    assert not output.verdict.passed


async def test_check_messages_round_trip_and_are_decoded_strictly(span):
    client = Client(span)
    node = Identity.generate()
    x = torch.randn(1, 2, span.hidden_size)
    request = client.request(client.node_session, 0, 0, x)
    receipt = make_receipt(node, request, tensor_digest(x), GENESIS_CHAIN)
    client.claims.append(StepClaim(request, receipt, x, x.clone()))
    check = client.check()
    again = CheckMessage.from_message(check.to_message())
    assert again.request.digest() == check.request.digest()
    assert [r.digest() for r in again.node_receipts] == [receipt.digest()]
    assert torch.equal(again.claimed, check.claimed) and again.beacon_epoch == 42
    message = check.to_message()
    for body in (
        {**message.body, "node_requests": [b"junk"]},
        {**message.body, "node_requests": []},
        {**message.body, "node_receipts": [message.body["node_receipts"][0]] * 2},
        {**message.body, "beacon_epoch": -1},
        {**message.body, "previous_chain": b"short"},
        {**message.body, "extra": 1},
    ):
        with pytest.raises(InvalidInput):
            CheckMessage.from_message(Message(message.kind, body, message.tensors))
    with pytest.raises(InvalidInput):
        CheckMessage.from_message(Message(message.kind, message.body, message.tensors[:1]))
    with pytest.raises(InvalidInput, match=str(MAX_CHECK_STEPS)):
        dataclasses.replace(check, node_requests=(request,) * (MAX_CHECK_STEPS + 1))
    parts = WireLimits().max_metadata_bytes
    many = dataclasses.replace(
        check,
        node_requests=(request,) * MAX_CHECK_STEPS,
        node_receipts=(receipt,) * MAX_CHECK_STEPS,
    )
    assert len(canonical(many.to_message().body)) < parts  # the largest check fits the wire


def _swap(claims: list[StepClaim], index: int, receipt: Receipt) -> tuple[Receipt, ...]:
    receipts = [c.receipt for c in claims]
    receipts[index] = receipt
    return tuple(receipts)
