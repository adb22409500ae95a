"""Shared helpers of the ledger tests: signed step pairs, attestations, reports, made-up
fraud evidence, a live server.

Owned by the ledger's tests (imported as ``ledger_fixtures``; pytest puts ``tests/`` on the
path). The server helper starts ``python -m corolla.ledger_server`` on a free loopback port
(:class:`corolla.simulations.ledger_process.LedgerProcess`), waits for it with a bounded loop,
and always stops it.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from corolla.ledger.api.reports import Attestation, report_body
from corolla.simulations.ledger_process import LedgerProcess, free_port
from corolla.verify import GENESIS_CHAIN, Identity, make_receipt, sign_request, tensor_digest
from corolla.verify.evidence import FraudEvidence, Recomputation, StepClaim
from corolla.verify.receipts import Receipt, StepRequest

__all__ = [
    "LedgerServer",
    "attest",
    "attested_report",
    "free_port",
    "made_up_evidence",
    "make_pairs",
    "pair_dicts",
    "running_server",
    "seed_identity",
]

MODEL = bytes.fromhex("11" * 32)
SPAN = bytes.fromhex("22" * 32)


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
            model_digest=MODEL,
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


def attest(
    client: Identity,
    verifier: Identity,
    pairs: list[tuple[StepRequest, Receipt]],
    *,
    steps: int | None = None,
    passed: bool = True,
    tokens: int | None = None,
) -> Attestation:
    """The client's attestation that ``verifier`` recomputed the first ``steps`` (default: all)
    of the node-session in ``pairs`` (which must start at step 0) and the check ``passed``."""
    steps = len(pairs) if steps is None else steps
    first = pairs[0][1]
    total = sum(receipt.tokens for _, receipt in pairs[:steps])
    request = sign_request(
        client,
        protocol_version=first.protocol_version,
        model_digest=first.model_digest,
        span_digest=first.span_digest,
        start=first.start,
        end=first.end,
        session_id=secrets.token_bytes(16),
        step=0,
        position=0,
        tokens=total if tokens is None else tokens,
        input_digest=secrets.token_bytes(32),
    )
    receipt = make_receipt(verifier, request, secrets.token_bytes(32), GENESIS_CHAIN)
    return Attestation(
        node_key=first.node_key,
        session_id=first.session_id,
        start=first.start,
        end=first.end,
        steps=steps,
        passed=passed,
        score="2.5e-06" if passed else "0.31",
        request=request,
        receipt=receipt,
    )


def attested_report(
    client: Identity, node: Identity, verifier: Identity, **pairs_options: Any
) -> dict[str, Any]:
    """The JSON body of a report of one node-session, fully checked by ``verifier``."""
    pairs = make_pairs(client, node, **pairs_options)
    return report_body(pairs, [attest(client, verifier, pairs)])


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


def pair_dicts(pairs: list[tuple[StepRequest, Receipt]]) -> list[dict[str, Any]]:
    """The JSON form of pairs, as the ledger's API takes them."""
    return [{"request": r.to_dict(), "receipt": c.to_dict()} for r, c in pairs]


class LedgerServer(LedgerProcess):
    """A ledger server process on 127.0.0.1, as the tests use it."""

    def __init__(self, db: Path, key: Path, *, extra: tuple[str, ...] = ()) -> None:
        super().__init__(db, key, extra=extra)


@contextlib.contextmanager
def running_server(db: Path, key: Path, *, extra: tuple[str, ...] = ()) -> Iterator[LedgerServer]:
    """A ledger server for the duration of the block."""
    server = LedgerServer(db, key, extra=extra)
    try:
        yield server
    finally:
        server.stop()
