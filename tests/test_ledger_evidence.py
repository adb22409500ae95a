"""Judging fraud evidence over HTTP with a real tiny model: a "node" runs a real span (and
cheats when told to), a "client" signs its requests, "verifiers" recompute honestly (or lie).
With a referee the ledger recomputes the accused span itself; without one, two agreeing
trusted verifiers convict. Forged evidence, a tampered tensor, a recomputation by the accused
or the client, and evidence against an honest node are refused with the reason; the audit
passes after all of it and fails when a stored evidence byte changes."""

from __future__ import annotations

import dataclasses
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from ledger_fixtures import LedgerServer, report_by_fresh_verifier, running_server
from typer.testing import CliRunner

from corolla.errors import LedgerRefused
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.models import b64encode
from corolla.ledger.cli import register
from corolla.ledger.store import LedgerStore
from corolla.ledger_server import load_referee
from corolla.node.model.span import Span, load_span
from corolla.verify import GENESIS_CHAIN, make_receipt, sign_request, tensor_digest
from corolla.verify.encoding import canonical
from corolla.verify.evidence import FraudEvidence, Recomputation, StepClaim
from corolla.verify.identity import Identity
from corolla.verify.referee import RefereeFinding

START, END = 1, 3
STEPS = (5, 1, 1, 1)  # a prefill of 5 tokens, then three decode steps


@pytest.fixture(scope="module")
def span(bloom_dir: Path) -> Span:
    return load_span(bloom_dir, START, END)


@pytest.fixture(scope="module")
def refereed(tmp_path_factory: pytest.TempPathFactory, bloom_dir: Path) -> Iterator[LedgerServer]:
    directory = tmp_path_factory.mktemp("refereed")
    extra = ("--referee-model", str(bloom_dir))
    with running_server(directory / "ledger.db", directory / "ledger.key", extra=extra) as server:
        yield server


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerServer]:
    directory = tmp_path_factory.mktemp("plain")
    with running_server(directory / "ledger.db", directory / "ledger.key") as server:
        yield server


def serve_session(
    span: Span, client: Identity, node: Identity, *, cheat: float = 0.0
) -> tuple[StepClaim, ...]:
    """The node runs a session step by step with its KV cache; with ``cheat``, it adds noise of
    that relative size to its output at step 2 (and still signs what it returns)."""
    session, chain, position, claims = secrets.token_bytes(16), GENESIS_CHAIN, 0, []
    cache = span.new_cache(1)
    for step, tokens in enumerate(STEPS):
        x = torch.randn(1, tokens, span.hidden_size)  # batch, tokens, hidden
        request = sign_request(
            client,
            protocol_version=1,
            model_digest=span.model_digest,
            span_digest=span.digest,
            start=START,
            end=END,
            session_id=session,
            step=step,
            position=position,
            tokens=tokens,
            input_digest=tensor_digest(x),
        )
        y = span.forward(x, cache)
        if cheat and step == 2:
            y = y + cheat * y.std() * torch.randn_like(y)
        receipt = make_receipt(node, request, tensor_digest(y), chain)
        claims.append(StepClaim(request, receipt, x, y))
        chain, position = receipt.chain_digest, position + tokens
    return tuple(claims)


def recompute(
    span: Span, client: Identity, verifier: Identity, claims: tuple[StepClaim, ...], lie: float = 0
) -> Recomputation:
    """A verifier's one-shot recomputation of the node's whole prefix (a lie adds noise)."""
    prefix = torch.cat([claim.input for claim in claims], dim=1)  # batch, all tokens, hidden
    request = sign_request(
        client,
        protocol_version=1,
        model_digest=span.model_digest,
        span_digest=span.digest,
        start=START,
        end=END,
        session_id=secrets.token_bytes(16),
        step=0,
        position=0,
        tokens=prefix.shape[1],
        input_digest=tensor_digest(prefix),
    )
    output = span.forward(prefix)
    if lie:
        output = output + lie * output.std() * torch.randn_like(output)
    receipt = make_receipt(verifier, request, tensor_digest(output), GENESIS_CHAIN)
    return Recomputation(request, receipt, output)


def pairs_of(claims: tuple[StepClaim, ...]) -> list[tuple[object, object]]:
    return [(claim.request, claim.receipt) for claim in claims]


def earn(server: LedgerServer, span: Span, node: Identity) -> int:
    """A client reports a session of ``node``'s that passed a check; returns the node's points."""
    client = Identity.generate()
    claims = serve_session(span, client, node)
    report_by_fresh_verifier(server.url, client, pairs_of(claims))  # type: ignore[arg-type]
    with LedgerClient(server.url) as ledger:
        return ledger.balance(node.public_key)


def test_the_referee_convicts_a_cheating_node_which_then_earns_nothing(
    refereed: LedgerServer, span: Span
) -> None:
    client, node, verifier = Identity.generate(), Identity.generate(), Identity.generate()
    earned = earn(refereed, span, node)
    assert earned == 2 * 8
    cheated = serve_session(span, client, node, cheat=0.05)
    recomputation = recompute(span, client, verifier, cheated)
    # The verifier's failed check keeps the session unpaid...
    result = report_by_fresh_verifier(refereed.url, client, pairs_of(cheated), passed=False)  # type: ignore[arg-type]
    assert {pair["credited_units"] for pair in result[0]["pairs"]} == {0}
    with LedgerClient(refereed.url, client) as ledger:
        # ...and its evidence, judged by the referee, slashes the node.
        verdict = ledger.submit_evidence(FraudEvidence("fp32", cheated, (recomputation,)))
        assert (verdict.verdict, verdict.judge) == ("guilty", "referee")
        assert verdict.accused == node.public_key and verdict.taken == earned
        account = ledger.account(node.public_key)
        assert account is not None and account.slashed
        assert (account.balance, account.reputation) == (0, 0)
        history = ledger.history(node.public_key, limit=3)
        assert [entry.kind for entry in history] == [
            "reputation_changed",
            "slash",
            "fraud_evidence",
        ]
        assert history[1].ref == verdict.evidence_digest
    assert earn(refereed, span, node) == 0  # a slashed node earns nothing more


def test_evidence_against_an_honest_node_is_refused_by_the_referee(
    refereed: LedgerServer, span: Span
) -> None:
    client, node, liar = Identity.generate(), Identity.generate(), Identity.generate()
    earned = earn(refereed, span, node)
    claims = serve_session(span, client, node)
    framed = FraudEvidence("fp32", claims, (recompute(span, client, liar, claims, lie=0.05),))
    with LedgerClient(refereed.url, client) as ledger:
        with pytest.raises(LedgerRefused, match="match the referee's recomputation") as refused:
            ledger.submit_evidence(framed)
        assert refused.value.status_code == 409
        account = ledger.account(node.public_key)
    assert account is not None and not account.slashed and account.balance == earned


def test_forged_tampered_and_self_checked_evidence_is_refused_with_the_reason(
    refereed: LedgerServer, span: Span
) -> None:
    client, node, verifier = Identity.generate(), Identity.generate(), Identity.generate()
    earned = earn(refereed, span, node)
    claims = serve_session(span, client, node, cheat=0.05)
    honest = recompute(span, client, verifier, claims)
    forged_receipt = dataclasses.replace(claims[1].receipt, signature=bytes(64))
    forged = (claims[0], dataclasses.replace(claims[1], receipt=forged_receipt), *claims[2:])
    output = claims[2].output.clone()
    output[0, 0, 0] += 1.0  # the node's real claim, one number changed afterwards
    tampered = (*claims[:2], dataclasses.replace(claims[2], output=output), claims[3])
    cases = {
        "signature does not verify": FraudEvidence("fp32", forged, (honest,)),
        "names another output than the one received": FraudEvidence("fp32", tampered, (honest,)),
        "by the accused or the client": FraudEvidence(
            "fp32", claims, (recompute(span, client, node, claims),)
        ),
        "not independent": FraudEvidence(
            "fp32", claims, (recompute(span, client, client, claims),)
        ),
    }
    with LedgerClient(refereed.url, client) as ledger:
        for reason, evidence in cases.items():
            with pytest.raises(LedgerRefused, match=reason) as refused:
                ledger.submit_evidence(evidence)
            assert refused.value.status_code == 400
        account = ledger.account(node.public_key)
    assert account is not None and not account.slashed and account.balance == earned


def test_without_a_referee_two_agreeing_trusted_verifiers_convict(
    plain: LedgerServer, span: Span
) -> None:
    client = Identity.generate()
    first, second, liar = Identity.generate(), Identity.generate(), Identity.generate()
    with LedgerClient(plain.url, client) as ledger:
        # One verifier's word convicts nobody: logged, unjudged (202).
        node = Identity.generate()
        claims = serve_session(span, client, node, cheat=0.05)
        alone = FraudEvidence("fp32", claims, (recompute(span, client, first, claims),))
        verdict = ledger.submit_evidence(alone)
        assert (verdict.verdict, verdict.taken) == ("unjudged", 0)
        assert "needs two that agree" in verdict.reason
        # Two that disagree with each other convict nobody either.
        split = FraudEvidence(
            "fp32",
            claims,
            (recompute(span, client, first, claims), recompute(span, client, liar, claims, 0.3)),
        )
        assert ledger.submit_evidence(split).verdict == "unjudged"
        # An honest node's outputs match the recomputations: refused.
        honest = serve_session(span, client, node)
        clean = FraudEvidence("fp32", honest, (recompute(span, client, first, honest),))
        with pytest.raises(LedgerRefused, match="match every recomputation") as refused:
            ledger.submit_evidence(clean)
        assert refused.value.status_code == 409
        assert ledger.account(node.public_key) is None  # never credited, never slashed
        # Two independent, trusted verifiers that agree with each other: guilty.
        earned = earn(plain, span, node)
        both = FraudEvidence(
            "fp32",
            claims,
            (recompute(span, client, first, claims), recompute(span, client, second, claims)),
        )
        verdict = ledger.submit_evidence(both)
        assert (verdict.verdict, verdict.judge, verdict.taken) == ("guilty", "verifiers", earned)
        account = ledger.account(node.public_key)
        assert account is not None and account.slashed and account.balance == 0


class LyingReferee:
    """A dishonest operator's referee: it finds every accused guilty."""

    def review(self, evidence: object) -> RefereeFinding:
        return RefereeFinding("failed", "0.5", "")


def test_an_auditor_with_the_model_catches_a_referee_that_convicts_an_honest_node(
    span: Span, bloom_dir: Path, tmp_path: Path
) -> None:
    client, node, verifier = Identity.generate(), Identity.generate(), Identity.generate()
    store = LedgerStore(tmp_path / "ledger.db", Identity.generate(), referee=LyingReferee())
    try:
        claims = serve_session(span, client, node)  # honest outputs
        evidence = FraudEvidence("fp32", claims, (recompute(span, client, verifier, claims),))
        body = {"evidence": b64encode(evidence.to_bytes())}
        envelope = sign_envelope(client, "evidence", canonical(body))
        assert store.submit(envelope, body)["verdict"] == "guilty"
    finally:
        store.close()
    trusting = run("audit", "--db", str(tmp_path / "ledger.db"))
    assert trusting.startswith("exit 0"), trusting  # without the model it takes the verdict
    checking = run("audit", "--db", str(tmp_path / "ledger.db"), "--referee-model", str(bloom_dir))
    assert checking.startswith("exit 1")
    assert "the referee's conviction is not supported" in checking


def run(*args: str) -> str:
    app = typer.Typer()
    register(app, referee_factory=load_referee)
    result = CliRunner().invoke(app, ["ledger", *args])
    return f"exit {result.exit_code}: {result.output}"


def test_the_audit_passes_after_all_of_it_and_fails_when_an_evidence_byte_changes(
    refereed: LedgerServer, plain: LedgerServer, span: Span, bloom_dir: Path, tmp_path: Path
) -> None:
    client, node, verifier = Identity.generate(), Identity.generate(), Identity.generate()
    claims = serve_session(span, client, node, cheat=0.05)
    with LedgerClient(refereed.url, client) as ledger:
        evidence = FraudEvidence("fp32", claims, (recompute(span, client, verifier, claims),))
        assert ledger.submit_evidence(evidence).verdict == "guilty"
    for server in (refereed, plain):
        assert run("audit", "--url", server.url).startswith("exit 0"), server.url
    checked = run("audit", "--url", refereed.url, "--referee-model", str(bloom_dir), "--json")
    assert checked.startswith("exit 0") and '"referee_recomputed": ' in checked
    assert '"referee_recomputed": 0' not in checked
    # A copy of the log with one byte of stored evidence changed fails the audit.
    copy = tmp_path / "copy.db"
    with sqlite3.connect(refereed.db) as live, sqlite3.connect(copy) as target:
        live.backup(target)
    with sqlite3.connect(copy) as conn:
        op, body = conn.execute(
            "SELECT op, body FROM operations WHERE action = 'evidence' ORDER BY op DESC LIMIT 1"
        ).fetchone()
        first = conn.execute("SELECT MIN(seq) FROM entries WHERE op = ?", (op,)).fetchone()[0]
        position = len(body) // 2
        letter = b"B" if body[position : position + 1] == b"A" else b"A"
        edited = body[:position] + letter + body[position + 1 :]
        conn.execute("UPDATE operations SET body = ? WHERE op = ?", (edited, op))
    failed = run("audit", "--db", str(copy))
    assert failed.startswith("exit 1")
    assert f"entry {first}: it does not match the signed operation behind it" in failed
