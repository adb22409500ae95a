"""Shared helpers of the ledger tests: signed step pairs, checks (checks v2: a verifier's signed
verdict with its recomputation and the ledger's beacon), reports, made-up fraud evidence, a
live server.

Owned by the ledger's tests (imported as ``ledger_fixtures``; pytest puts ``tests/`` on the
path). The server helper starts ``python -m corolla.ledger_server`` on a free loopback port
(:class:`corolla.simulations.ledger_process.LedgerProcess`), with one-second beacon epochs
unless told otherwise, waits for it with a bounded loop, and always stops it.

A check counts only when its verifier declared serving the span before the beacon's epoch
began and is within reach of the assignment: :func:`declare` and :func:`next_beacon` (in
process, on a :class:`Clock`) or :func:`earn` (over HTTP) arrange that, and :func:`check`
builds the attestation a verifier would sign.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from corolla.errors import LedgerRefused
from corolla.ledger.api.checks import Serving
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.reports import Attestation
from corolla.ledger.store import LedgerStore
from corolla.simulations.ledger_process import LedgerProcess, free_port
from corolla.verify import GENESIS_CHAIN, Identity, make_receipt, sign_request, tensor_digest
from corolla.verify.beacon import Beacon
from corolla.verify.disputes import CheckRecord, Dispute
from corolla.verify.encoding import canonical
from corolla.verify.evidence import FraudEvidence, Recomputation, StepClaim
from corolla.verify.receipts import Receipt, StepRequest
from corolla.verify.verdicts import CheckVerdict, sign_verdict

__all__ = [
    "MODEL",
    "PROFILE",
    "THRESHOLD",
    "Clock",
    "LedgerServer",
    "check",
    "declare",
    "declare_over_http",
    "earn",
    "free_port",
    "made_up_dispute",
    "made_up_evidence",
    "make_pairs",
    "next_beacon",
    "pair_dicts",
    "report_by_fresh_verifier",
    "report_checked",
    "running_server",
    "seed_identity",
    "store_submitter",
    "wait_for_next_beacon",
]

MODEL = bytes.fromhex("11" * 32)
SPAN = bytes.fromhex("22" * 32)
PROFILE = "fp32"
THRESHOLD = 1e-3
"""The fp32 profile's default threshold (no calibration published)."""
WIDE = (0, 64)
"""The blocks a test verifier declares: they cover every span the tests use."""


def seed_identity(name: str) -> Identity:
    """A deterministic identity per name (readable tests)."""
    return Identity.from_seed(name.encode().ljust(32, b".")[:32])


def make_pairs(
    client: Identity,
    node: Identity,
    *,
    session: bytes | None = None,
    steps: int = 3,
    start: int = 0,
    end: int = 4,
    first_step: int = 0,
    prefill: int = 5,
    ticket: bytes | None = None,
    model: bytes = MODEL,
) -> list[tuple[StepRequest, Receipt]]:
    """A node-session's consecutive steps: a prefill of ``prefill`` tokens, then one token
    per step, each request signed by the client and each receipt by the node (chained)."""
    session = session or secrets.token_bytes(16)
    pairs = []
    chain = GENESIS_CHAIN
    position = 0 if first_step == 0 else prefill + first_step - 1
    for step in range(first_step, first_step + steps):
        tokens = prefill if step == 0 else 1
        request = sign_request(
            client,
            protocol_version=1,
            model_digest=model,
            span_digest=SPAN,
            start=start,
            end=end,
            session_id=session,
            step=step,
            position=position,
            tokens=tokens,
            input_digest=secrets.token_bytes(32),
            ticket_digest=ticket,
        )
        receipt = make_receipt(node, request, secrets.token_bytes(32), chain)
        chain = receipt.chain_digest
        position += tokens
        pairs.append((request, receipt))
    return pairs


def random_pair(
    client: Identity,
    node: Identity,
    *,
    start: int,
    end: int,
    step: int,
    position: int,
    tokens: int,
    ticket: bytes | None = None,
) -> tuple[StepRequest, Receipt]:
    """One signed step (request and receipt) at the given place, every digest random."""
    request = sign_request(
        client,
        protocol_version=1,
        model_digest=secrets.token_bytes(32),
        span_digest=secrets.token_bytes(32),
        start=start,
        end=end,
        session_id=secrets.token_bytes(16),
        step=step,
        position=position,
        tokens=tokens,
        input_digest=secrets.token_bytes(32),
        ticket_digest=ticket,
    )
    return request, make_receipt(node, request, secrets.token_bytes(32), GENESIS_CHAIN)


def check(
    client: Identity,
    verifier: Identity,
    pairs: list[tuple[StepRequest, Receipt]],
    beacon: Beacon,
    *,
    first_step: int | None = None,
    end_step: int | None = None,
    passed: bool = True,
    score: str | None = None,
    threshold: str = repr(THRESHOLD),
    profile: str = PROFILE,
    node_chain: bytes | None = None,
    recomputed: int | None = None,
) -> Attestation:
    """The attestation of ``verifier``'s check of the node's steps ``[first_step, end_step)``
    in ``pairs`` (default: all of them), assigned by ``beacon``: the client's request for the
    recomputation, the verifier's receipt for it and its signed verdict (``passed``, with a
    score that agrees unless ``score`` is given). The keyword arguments forge the parts a test
    wants wrong."""
    by_step = {receipt.step: (request, receipt) for request, receipt in pairs}
    first_step = min(by_step) if first_step is None else first_step
    end_step = max(by_step) + 1 if end_step is None else end_step
    first, last = by_step[first_step][1], by_step[end_step - 1][1]
    start_position, end_position = first.position, last.position + last.tokens
    request = sign_request(
        client,
        protocol_version=first.protocol_version,
        model_digest=first.model_digest,
        span_digest=first.span_digest,
        start=first.start,
        end=first.end,
        session_id=secrets.token_bytes(16),
        step=0 if start_position == 0 else 1,
        position=start_position,
        tokens=end_position - start_position,
        input_digest=secrets.token_bytes(32),
    )
    previous = GENESIS_CHAIN if start_position == 0 else secrets.token_bytes(32)
    receipt = make_receipt(verifier, request, secrets.token_bytes(32), previous)
    unsigned = CheckVerdict(
        verifier_key=verifier.public_key,
        client_key=client.public_key,
        node_key=first.node_key,
        model_digest=first.model_digest,
        span_digest=first.span_digest,
        node_chain=last.chain_digest if node_chain is None else node_chain,
        recomputation_digest=receipt.digest(),
        session_id=first.session_id,
        start=first.start,
        end=first.end,
        first_step=first_step,
        end_step=end_step,
        first_position=start_position,
        end_position=end_position,
        beacon_epoch=beacon.epoch,
        recomputed_positions=end_position - start_position if recomputed is None else recomputed,
        profile=profile,
        score=(("2.5e-06" if passed else "0.31") if score is None else score),
        threshold=threshold,
        passed=passed,
        signature=bytes(64),
    )
    return Attestation(sign_verdict(verifier, unsigned), request, receipt, beacon)


class Clock:
    """The ledger's clock in process tests: starts at the real time (so envelopes signed now
    are fresh) and moves only when told."""

    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


Submit = Callable[[Identity, str, Any], dict[str, Any]]


def store_submitter(store: LedgerStore) -> Submit:
    """Sign and submit an operation to an in-process store (timestamped by its clock)."""

    def submit(author: Identity, action: str, body: Any) -> dict[str, Any]:
        envelope = sign_envelope(author, action, canonical(body), timestamp=store.clock())
        return store.submit(envelope, body)

    return submit


def declare(
    submit: Submit,
    verifier: Identity,
    *,
    model: bytes = MODEL,
    blocks: tuple[int, int] = WIDE,
    profile: str = PROFILE,
) -> dict[str, Any]:
    """``verifier`` declares serving ``blocks`` of ``model`` under ``profile``."""
    return submit(verifier, "serving", Serving(model, *blocks, profile).to_body())


def next_beacon(store: LedgerStore, clock: Clock) -> Beacon:
    """Move ``clock`` to the start of the next beacon epoch and return its beacon: everything
    logged so far was logged before that epoch began."""
    period = store.rules.beacon_period_s * 1000
    clock.now = (clock.now // period + 1) * period
    return store.beacon()


def earn(
    url: str,
    client: Identity,
    node: Identity,
    *,
    steps: int = 3,
    prefill: int = 5,
    start: int = 0,
    end: int = 4,
) -> list[dict[str, Any]]:
    """Over HTTP: a session of ``node``'s for ``client``, checked by a fresh verifier that
    declared serving a fresh model (so it is the only candidate, hence the assigned one), and
    reported; the ledger credits it. Waits for the next beacon epoch (one second in the test
    servers). Returns the report's result."""
    model, verifier = secrets.token_bytes(32), Identity.generate()
    declare_over_http(url, verifier, model=model)
    pairs = make_pairs(client, node, steps=steps, prefill=prefill, start=start, end=end,
                       model=model)  # fmt: skip
    return report_checked(url, client, verifier, pairs)


def declare_over_http(
    url: str,
    verifier: Identity,
    *,
    model: bytes = MODEL,
    blocks: tuple[int, int] = WIDE,
    profile: str = PROFILE,
) -> None:
    """``verifier`` declares serving ``blocks`` of ``model`` to the ledger at ``url``."""
    with LedgerClient(url, verifier) as as_verifier:
        as_verifier.declare_serving(model, *blocks, profile)


def report_checked(
    url: str,
    client: Identity,
    verifier: Identity,
    pairs: list[tuple[StepRequest, Receipt]],
    *,
    passed: bool = True,
) -> list[dict[str, Any]]:
    """Report ``pairs`` with ``verifier``'s check of all of them, assigned by the beacon of the
    next epoch (``verifier`` must be the only candidate for their model and span)."""
    with LedgerClient(url, client) as as_client:
        beacon = wait_for_next_beacon(as_client)
        attestation = check(client, verifier, pairs, beacon, passed=passed)
        return as_client.submit_report(pairs, [attestation])


def report_by_fresh_verifier(
    url: str,
    client: Identity,
    pairs: list[tuple[StepRequest, Receipt]],
    *,
    passed: bool = True,
) -> list[dict[str, Any]]:
    """Report ``pairs`` checked by a fresh verifier that declares serving exactly their model and
    blocks for the next epoch (and withdraws afterwards, so the next such report draws among
    fresh candidates again): the only candidate, hence the assigned verifier."""
    first = pairs[0][1]
    verifier = Identity.generate()
    blocks = (first.start, first.end)
    declare_over_http(url, verifier, model=first.model_digest, blocks=blocks)
    try:
        return report_checked(url, client, verifier, pairs, passed=passed)
    finally:
        with LedgerClient(url, verifier) as as_verifier:
            as_verifier.withdraw_serving(first.model_digest, *blocks, PROFILE)


def wait_for_next_beacon(ledger: LedgerClient, timeout: float = 30.0) -> Beacon:
    """The beacon of the first epoch that begins after now (bounded wait)."""
    epoch = ledger.beacon().epoch + 1
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(LedgerRefused):  # 425 until the epoch begins
            return ledger.beacon(epoch)
        if time.monotonic() > deadline:
            raise TimeoutError(f"beacon epoch {epoch} did not begin within {timeout} s")
        time.sleep(0.05)


def made_up_evidence(
    client: Identity,
    node: Identity,
    verifiers: list[Identity],
    *,
    wrong: bool = True,
    verifiers_agree: bool = True,
) -> FraudEvidence:
    """Genuinely signed fraud evidence over a made-up computation (``tanh`` stands for the
    span; no model needed): the node's claims are wrong by 10 % at its last step (or right),
    and each verifier recomputes honestly (or, with ``verifiers_agree=False``, each with its
    own error). For tests of the rules; the tests of judging use a real model."""
    session, chain, position, claims = secrets.token_bytes(16), GENESIS_CHAIN, 0, []
    generator = torch.Generator().manual_seed(len(verifiers))
    for step, tokens in enumerate((4, 1, 1)):
        x = torch.randn(1, tokens, 16, generator=generator)
        y = torch.tanh(x)
        if wrong and step == 2:
            y = y * 1.1
        request = sign_request(
            client,
            protocol_version=1,
            model_digest=MODEL,
            span_digest=SPAN,
            start=0,
            end=4,
            session_id=session,
            step=step,
            position=position,
            tokens=tokens,
            input_digest=tensor_digest(x),
        )
        receipt = make_receipt(node, request, tensor_digest(y), chain)
        claims.append(StepClaim(request, receipt, x, y))
        chain, position = receipt.chain_digest, position + tokens
    prefix = torch.cat([claim.input for claim in claims], dim=1)
    recomputations = []
    for number, verifier in enumerate(verifiers):
        output = torch.tanh(prefix)
        if not verifiers_agree:
            output = output * (1 + 0.2 * (number + 1))
        request = sign_request(
            client,
            protocol_version=1,
            model_digest=MODEL,
            span_digest=SPAN,
            start=0,
            end=4,
            session_id=secrets.token_bytes(16),
            step=0,
            position=0,
            tokens=prefix.shape[1],
            input_digest=tensor_digest(prefix),
        )
        receipt = make_receipt(verifier, request, tensor_digest(output), GENESIS_CHAIN)
        recomputations.append(Recomputation(request, receipt, output))
    return FraudEvidence("fp32", tuple(claims), tuple(recomputations))


def made_up_dispute(client: Identity, node: Identity, verifier: Identity) -> Dispute:
    """A genuinely signed dispute over a made-up computation (``tanh`` stands for the span, as
    in :func:`made_up_evidence`): the node's claims are honest, and ``verifier`` recomputes them
    honestly but signs a *failed* verdict. For tests of the rules without a model."""
    evidence = made_up_evidence(client, node, [verifier], wrong=False)
    claims, recomputation = evidence.claims, evidence.recomputations[0]
    prefix = evidence.prefix
    unsigned = CheckVerdict(
        verifier_key=verifier.public_key,
        client_key=client.public_key,
        node_key=node.public_key,
        model_digest=MODEL,
        span_digest=SPAN,
        node_chain=claims[-1].receipt.chain_digest,
        recomputation_digest=recomputation.receipt.digest(),
        session_id=claims[0].request.session_id,
        start=0,
        end=4,
        first_step=0,
        end_step=len(claims),
        first_position=0,
        end_position=prefix.shape[1],
        beacon_epoch=0,
        recomputed_positions=prefix.shape[1],
        profile=PROFILE,
        score="0.0",
        threshold=repr(THRESHOLD),
        passed=False,
        signature=bytes(64),
    )
    record = CheckRecord(
        sign_verdict(verifier, unsigned),
        recomputation.request,
        recomputation.receipt,
        recomputation.output,
    )
    return Dispute(PROFILE, claims, (record,))


def pair_dicts(pairs: list[tuple[StepRequest, Receipt]]) -> list[dict[str, Any]]:
    """The JSON form of pairs, as the ledger's API takes them."""
    return [{"request": r.to_dict(), "receipt": c.to_dict()} for r, c in pairs]


class LedgerServer(LedgerProcess):
    """A ledger server process on 127.0.0.1, as the tests use it (one-second beacon epochs
    unless ``extra`` names ``--beacon-period-s``)."""

    def __init__(self, db: Path, key: Path, *, extra: tuple[str, ...] = ()) -> None:
        if "--beacon-period-s" not in extra:
            extra = ("--beacon-period-s", "1", *extra)
        super().__init__(db, key, extra=extra)


@contextlib.contextmanager
def running_server(db: Path, key: Path, *, extra: tuple[str, ...] = ()) -> Iterator[LedgerServer]:
    """A ledger server for the duration of the block."""
    server = LedgerServer(db, key, extra=extra)
    try:
        yield server
    finally:
        server.stop()
