"""Check sessions: a verifier recomputes a node's steps on its own session and signs a verdict.

For each (verifier V, node-session N) pair the client opens one inference session on V over N's
blocks, a *check session* that mirrors N's session from position 0. A check sends V the inputs
of N's steps V has not covered yet (all of ``[0, k)`` the first time, only the new ones after),
N's signed requests and receipts of those steps and N's claimed outputs
(:class:`~corolla.node.protocol.messages.CheckMessage`, at most
:data:`~corolla.node.protocol.messages.MAX_CHECK_STEPS` steps each); V recomputes with its KV
cache and answers with its receipt, its recomputation and its signed
:class:`~corolla.verify.verdicts.CheckVerdict`.

Nothing V says is taken on trust: its receipt must name the client's request and the returned
tensor and chain from V's previous step, its verdict must be signed by V and name exactly the
node, session, steps, positions, chain, beacon epoch and recomputation of this check, and it
must follow from its own score under the model's threshold
(:func:`~corolla.verify.verdicts.consistent`). A verifier whose answer does not check out
failed to answer (:class:`~corolla.errors.VerificationError`, or the transport's error); its
check session is dropped, and the caller passes it over. A check session the verifier has
dropped meanwhile (it was idle too long) is opened again, from N's step 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

import torch

from corolla.client.node_work import NodeWork
from corolla.client.signer import Signer
from corolla.client.transport import NodeStream, StreamFactory
from corolla.errors import BadReceipt, NodeUnavailable, VerificationError
from corolla.node.model.manifest import Manifest
from corolla.node.protocol.messages import MAX_CHECK_STEPS, CheckMessage, OpenSession, StepMessage
from corolla.node.protocol.records import ServerRecord
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.disputes import CheckRecord
from corolla.verify.receipts import sign_request, verify_receipt
from corolla.verify.verdicts import consistent, verify_verdict
from corolla.version import PROTOCOL_VERSION

__all__ = ["CheckStreams"]


@dataclass(eq=False)
class _CheckSession:
    record: ServerRecord
    stream: NodeStream
    session_id: bytes
    step: int = 0
    """V's next step on its check session."""
    covered: int = 0
    """N's steps V has covered."""
    chain: bytes = GENESIS_CHAIN
    """V's chain digest after its last step."""


class CheckStreams:
    """The check sessions of one client session (closed with it)."""

    def __init__(
        self,
        transport: StreamFactory,
        identity: Signer,
        manifest: Manifest,
        batch_size: int,
        max_length: int,
        timeout: float,
    ) -> None:
        self.transport = transport
        self.identity = identity
        self.manifest = manifest
        self.batch_size = batch_size
        self.max_length = max_length
        self.timeout = timeout
        self._sessions: dict[tuple[str, bytes, bytes, int, int], _CheckSession] = {}
        self._locks: dict[tuple[str, bytes, bytes, int, int], asyncio.Lock] = {}
        self._closed = False

    async def check(
        self,
        verifier: ServerRecord,
        work: NodeWork,
        upto: int,
        epoch: int,
        profile: str,
        threshold: float,
    ) -> list[CheckRecord]:
        """Have ``verifier`` check N's steps up to ``upto`` it has not covered yet; the verdicts
        (one per check step, the last one first failed or all passed). Raises
        :class:`VerificationError` or a node error when ``verifier`` does not answer properly."""
        key = _key(verifier, work)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if self._closed:
                raise VerificationError("the session is closed")
            session = self._sessions.get(key)
            if session is not None:
                try:
                    return await self._run(key, session, work, upto, epoch, profile, threshold)
                except NodeUnavailable:
                    pass  # e.g. the verifier closed the idle check session: start it afresh
            session = await self._open(verifier, work)
            self._sessions[key] = session
            return await self._run(key, session, work, upto, epoch, profile, threshold)

    async def _run(
        self,
        key: tuple[str, bytes, bytes, int, int],
        session: _CheckSession,
        work: NodeWork,
        upto: int,
        epoch: int,
        profile: str,
        threshold: float,
    ) -> list[CheckRecord]:
        records: list[CheckRecord] = []
        try:
            while session.covered < upto:
                last = min(upto, session.covered + MAX_CHECK_STEPS)
                record = await self._step(session, work, last, epoch, profile, threshold)
                records.append(record)
                if not record.verdict.passed:
                    break
        except BaseException:
            self._sessions.pop(key, None)
            await session.stream.abort()
            raise
        return records

    async def close(self) -> None:
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.stream.close()

    async def _open(self, verifier: ServerRecord, work: NodeWork) -> _CheckSession:
        stream = self.transport.open_stream(verifier.peer_id)
        opening = OpenSession(
            session_id=os.urandom(16),
            batch_size=self.batch_size,
            max_length=self.max_length,
            start=work.hop.start,
            end=work.hop.end,
            client_key=self.identity.public_key,
        )
        try:
            async with asyncio.timeout(self.timeout):
                await stream.open(opening, self.timeout)
        except BaseException:
            await stream.abort()
            raise
        return _CheckSession(verifier, stream, opening.session_id)

    async def _step(
        self,
        session: _CheckSession,
        work: NodeWork,
        last: int,
        epoch: int,
        profile: str,
        threshold: float,
    ) -> CheckRecord:
        """One check step over N's steps ``[session.covered, last)``."""
        first = session.covered
        covered = work.claims[first:last]
        hidden = torch.cat([claim.input for claim in covered], dim=1)  # batch, tokens, hidden
        claimed = torch.cat([claim.output for claim in covered], dim=1)
        hop = work.hop
        request = sign_request(
            self.identity,
            protocol_version=PROTOCOL_VERSION,
            model_digest=self.manifest.model_digest,
            span_digest=self.manifest.span_digest(hop.start, hop.end),
            start=hop.start,
            end=hop.end,
            session_id=session.session_id,
            step=session.step,
            position=covered[0].request.position,
            tokens=hidden.shape[0] * hidden.shape[1],
            input_digest=tensor_digest(hidden),
        )
        message = CheckMessage(
            step=StepMessage(request, hidden),
            node_requests=tuple(claim.request for claim in covered),
            node_receipts=tuple(claim.receipt for claim in covered),
            claimed=claimed,
            previous_chain=work.chain_before(first),
            beacon_epoch=epoch,
            profile=profile,
        )
        async with asyncio.timeout(self.timeout):
            answer = await session.stream.check(message, self.timeout)
        output, receipt, verdict = answer.hidden, answer.receipt, answer.verdict
        verifier = session.record
        if output.shape != hidden.shape or output.dtype != hidden.dtype:
            raise BadReceipt(f"verifier {verifier.peer_id} returned a malformed recomputation")
        if not bool(torch.isfinite(output).all()):
            raise BadReceipt(f"verifier {verifier.peer_id} returned NaN or infinite values")
        verify_receipt(
            receipt,
            request=request,
            output=output,
            previous_chain=session.chain,
            node_key=verifier.public_key,
        )
        verify_verdict(verdict)
        last_claim = covered[-1].request
        expected = {
            "verifier_key": verifier.public_key,
            "client_key": self.identity.public_key,
            "node_key": work.node_key,
            "model_digest": self.manifest.model_digest,
            "span_digest": request.span_digest,
            "node_chain": covered[-1].receipt.chain_digest,
            "recomputation_digest": receipt.digest(),
            "session_id": work.session_id,
            "start": hop.start,
            "end": hop.end,
            "first_step": first,
            "end_step": last,
            "first_position": covered[0].request.position,
            "end_position": last_claim.position + last_claim.tokens,
            "beacon_epoch": epoch,
            "recomputed_positions": request.tokens,
            "profile": profile,
        }
        wrong = [name for name, value in expected.items() if getattr(verdict, name) != value]
        if wrong:
            raise BadReceipt(
                f"verifier {verifier.peer_id}'s verdict names another {', '.join(wrong)} than "
                "the check it was asked"
            )
        if not consistent(verdict, threshold):
            raise BadReceipt(
                f"verifier {verifier.peer_id}'s verdict ({verdict.score} under "
                f"{verdict.threshold}, passed={verdict.passed}) does not follow from the "
                f"{profile} threshold {threshold:.3g}"
            )
        session.step += 1
        session.covered = last
        session.chain = receipt.chain_digest
        return CheckRecord(verdict, request, receipt, output)


def _key(verifier: ServerRecord, work: NodeWork) -> tuple[str, bytes, bytes, int, int]:
    return (verifier.peer_id, work.node_key, work.session_id, work.hop.start, work.hop.end)
