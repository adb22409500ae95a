"""Disputes at the ledger (checks v2), with a real tiny BLOOM span: a node serves a session, a
client signs its requests, verifiers recompute and sign verdicts (honestly, or lying, or as a
cheating node's accomplice). The ledger's referee decides: every side that lied is slashed, an
honest node keeps its credit and is credited for the disputed steps; without a referee the
dispute is logged unjudged and slashes nobody. Malformed or inconsistent disputes are refused
with a 4xx before any tensor math; the audit replays every judgment (and re-judges with the
model)."""

from __future__ import annotations

import base64
import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
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
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.disputes import CheckRecord, Dispute, Judgment
from corolla.verify.encoding import canonical
from corolla.verify.evidence import StepClaim
from corolla.verify.identity import Identity
from corolla.verify.receipts import make_receipt, sign_request
from corolla.verify.tolerance import compare
from corolla.verify.verdicts import CheckVerdict, sign_verdict

START, END = 0, 2
STEPS = (5, 1, 1, 1)  # a prefill of 5 tokens, then three decode steps
THRESHOLD = 1e-3


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


def serve(
    span: Span, client: Identity, node: Identity, noise: float = 0.0
) -> tuple[StepClaim, ...]:
    """The node's session, step by step with its cache; ``noise`` corrupts its last step."""
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
        if noise and step == len(STEPS) - 1:
            y = y + noise * y.std() * torch.randn_like(y)
        receipt = make_receipt(node, request, tensor_digest(y), chain)
        claims.append(StepClaim(request, receipt, x, y))
        chain, position = receipt.chain_digest, position + tokens
    return tuple(claims)


def verdict_of(
    span: Span,
    client: Identity,
    claims: tuple[StepClaim, ...],
    verifier: Identity,
    *,
    output: torch.Tensor | None = None,
    passed: bool | None = None,
) -> CheckRecord:
    """``verifier``'s check of the whole session: its recomputation (honest unless ``output``
    is given) and its signed verdict (true to its numbers unless ``passed`` is forced)."""
    prefix = torch.cat([c.input for c in claims], dim=1)  # batch, all tokens, hidden
    claimed = torch.cat([c.output for c in claims], dim=1)
    recomputed = span.forward(prefix) if output is None else output
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
    receipt = make_receipt(verifier, request, tensor_digest(recomputed), GENESIS_CHAIN)
    comparison = compare(claimed, recomputed, "fp32", THRESHOLD)
    unsigned = CheckVerdict(
        verifier_key=verifier.public_key,
        client_key=client.public_key,
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
    return CheckRecord(sign_verdict(verifier, unsigned), request, receipt, recomputed)


def pairs_of(claims: tuple[StepClaim, ...]) -> list[tuple[object, object]]:
    return [(claim.request, claim.receipt) for claim in claims]


def account(url: str, key: bytes) -> tuple[int, bool]:
    with LedgerClient(url) as ledger:
        found = ledger.account(key)
    return (0, False) if found is None else (found.balance, found.slashed)


def earn_first_steps(url: str, client: Identity, claims: tuple[StepClaim, ...]) -> int:
    """The client reports the session's first two steps, checked by their assigned verifier;
    returns the node's balance."""
    result = report_by_fresh_verifier(url, client, pairs_of(claims)[:2])  # type: ignore[arg-type]
    assert [pair["credited_units"] for pair in result[0]["pairs"]] == [10, 2]
    return account(url, claims[0].receipt.node_key)[0]


def test_a_verifier_lying_against_an_honest_node_is_slashed_and_the_node_keeps_its_credit(
    refereed: LedgerServer, span: Span
) -> None:
    client, node, liar = Identity.generate(), Identity.generate(), Identity.generate()
    claims = serve(span, client, node)
    earned = earn_first_steps(refereed.url, client, claims)
    # The liar had earned points too (as a node): its slash takes them.
    liar_claims = serve(span, client, liar)
    earn_first_steps(refereed.url, client, liar_claims)
    lie = verdict_of(span, client, claims, liar, passed=False)
    with LedgerClient(refereed.url, client) as ledger:
        outcome = ledger.submit_dispute(Dispute("fp32", claims, (lie,)))
        assert outcome.judged and outcome.judge == "referee"
        assert not outcome.node_lied and outcome.lying_verifiers == (liar.public_key,)
        assert outcome.credited_units == 2 * 2  # steps 2 and 3: checked by the referee
        assert "lied" in outcome.reason
        with pytest.raises(LedgerRefused, match="already in the log") as again:
            ledger.submit_dispute(Dispute("fp32", claims, (lie,)))
        assert again.value.status_code == 409
    assert account(refereed.url, node.public_key) == (earned + 4, False)
    assert account(refereed.url, liar.public_key) == (0, True)


def test_a_cheating_node_and_its_accomplice_are_both_slashed(
    refereed: LedgerServer, span: Span
) -> None:
    client, node, accomplice, honest = (Identity.generate() for _ in range(4))
    earned = earn_first_steps(refereed.url, client, serve(span, client, node))
    assert earned > 0
    claims = serve(span, client, node, noise=0.05)
    claimed = torch.cat([c.output for c in claims], dim=1)
    cover = verdict_of(span, client, claims, accomplice, output=claimed)  # "recomputes" the lie
    truth = verdict_of(span, client, claims, honest)
    assert cover.verdict.passed and not truth.verdict.passed
    with LedgerClient(refereed.url, client) as ledger:
        outcome = ledger.submit_dispute(Dispute("fp32", claims, (cover, truth)))
        history = ledger.history(node.public_key, limit=3)
    assert outcome.node_lied and outcome.lying_verifiers == (accomplice.public_key,)
    assert outcome.credited_units == 0
    assert account(refereed.url, node.public_key) == (0, True)
    assert account(refereed.url, accomplice.public_key) == (0, True)
    assert account(refereed.url, honest.public_key) == (0, False)
    assert [entry.kind for entry in history] == ["reputation_changed", "slash", "dispute"]
    assert history[1].ref == outcome.dispute_digest


def test_without_a_referee_a_dispute_is_logged_unjudged_and_slashes_nobody(
    plain: LedgerServer, span: Span
) -> None:
    client, node, liar = Identity.generate(), Identity.generate(), Identity.generate()
    claims = serve(span, client, node)
    earned = earn_first_steps(plain.url, client, claims)
    dispute = Dispute("fp32", claims, (verdict_of(span, client, claims, liar, passed=False),))
    body = {"dispute": b64encode(dispute.to_bytes())}
    headers = sign_envelope(client, "dispute", canonical(body)).to_headers()
    answer = httpx.post(f"{plain.url}/v1/disputes", json=body, headers=headers, timeout=60)
    assert answer.status_code == 202, answer.text
    outcome = answer.json()
    assert (outcome["judged"], outcome["judge"], outcome["lying_verifiers"]) == (False, "none", [])
    assert "no referee" in outcome["reason"]
    assert account(plain.url, node.public_key) == (earned, False)
    assert account(plain.url, liar.public_key) == (0, False)


def submit_raw(url: str, author: Identity, body: object) -> httpx.Response:
    headers = sign_envelope(author, "dispute", canonical(body)).to_headers()
    return httpx.post(f"{url}/v1/disputes", json=body, headers=headers, timeout=60)


def test_malformed_and_inconsistent_disputes_are_refused_with_the_reason(
    refereed: LedgerServer, span: Span
) -> None:
    client, node, verifier = Identity.generate(), Identity.generate(), Identity.generate()
    claims = serve(span, client, node)
    record = verdict_of(span, client, claims, verifier, passed=False)
    good = Dispute("fp32", claims, (record,))
    forged_verdict = dataclasses.replace(record.verdict, node_chain=bytes(32))
    swapped = dataclasses.replace(claims[2], output=claims[2].output + 1)
    cases = {
        "not base64": ({"dispute": "%%%"}, client, 400, "base64"),
        "not a dispute": (
            {"dispute": base64.b64encode(b"\x00garbage").decode()},
            client,
            400,
            "",
        ),
        "extra field": ({"dispute": "", "more": 1}, client, 400, "exactly the fields"),
        "a forged verdict": (
            Dispute("fp32", claims, (dataclasses.replace(record, verdict=forged_verdict),)),
            client,
            400,
            "not signed by it",
        ),
        "a claimed output the receipt does not name": (
            Dispute("fp32", (*claims[:2], swapped, claims[3]), (record,)),
            client,
            400,
            "",
        ),
        "a gap in the claims": (Dispute("fp32", claims[1:], (record,)), client, 400, ""),
        "an unknown profile": (Dispute("fp64", claims, (record,)), client, 400, "profile"),
        "someone else than the client": (good, node, 403, "client of the claims"),
    }
    for name, (dispute, author, status, words) in cases.items():
        body = (
            {"dispute": b64encode(dispute.to_bytes())} if isinstance(dispute, Dispute) else dispute
        )
        answer = submit_raw(refereed.url, author, body)
        assert answer.status_code == status, (name, answer.text)
        assert words in answer.json()["error"], (name, answer.text)
    assert account(refereed.url, node.public_key) == (0, False)
    assert account(refereed.url, verifier.public_key) == (0, False)


class FlippingReferee:
    """A referee that convicts whoever its recomputation clears (to test the auditor)."""

    def __init__(self, bloom_dir: Path) -> None:
        from corolla.node.referee import Referee
        from corolla.verify.referee import RefereeConfig

        self.honest = Referee(RefereeConfig(bloom_dir))

    def review(self, evidence: object) -> object:
        return self.honest.review(evidence)

    def judge(self, dispute: Dispute) -> Judgment:
        truth = self.honest.judge(dispute)
        assert isinstance(truth, Judgment)
        return dataclasses.replace(truth, node_lied=not truth.node_lied, node_reason="flipped")


def run(*args: str) -> str:
    app = typer.Typer()
    register(app, referee_factory=load_referee)
    result = CliRunner().invoke(app, ["ledger", *args])
    return f"exit {result.exit_code}: {result.output}"


def test_the_audit_replays_every_judgment_and_rejudges_with_the_model(
    refereed: LedgerServer, plain: LedgerServer, span: Span, bloom_dir: Path, tmp_path: Path
) -> None:
    for server in (refereed, plain):
        assert run("audit", "--url", server.url).startswith("exit 0"), server.url
    rejudged = run("audit", "--url", refereed.url, "--referee-model", str(bloom_dir), "--json")
    assert rejudged.startswith("exit 0"), rejudged
    assert '"disputes_checked": 0' not in rejudged and '"referee_recomputed": 0' not in rejudged
    # A referee that convicts an honest node: the audit without the model takes its judgment,
    # the audit with the model does not.
    client, node, verifier = Identity.generate(), Identity.generate(), Identity.generate()
    claims = serve(span, client, node)
    dispute = Dispute("fp32", claims, (verdict_of(span, client, claims, verifier),))
    store = LedgerStore(
        tmp_path / "ledger.db", Identity.generate(), referee=FlippingReferee(bloom_dir)
    )
    try:
        body = {"dispute": b64encode(dispute.to_bytes())}
        result = store.submit(sign_envelope(client, "dispute", canonical(body)), body)
        assert result["node_lied"]
    finally:
        store.close()
    assert run("audit", "--db", str(tmp_path / "ledger.db")).startswith("exit 0")
    checking = run("audit", "--db", str(tmp_path / "ledger.db"), "--referee-model", str(bloom_dir))
    assert checking.startswith("exit 1")
    assert "does not support the referee's judgment" in checking
