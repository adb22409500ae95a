"""The node as a verifier: check steps on a check session (``docs/checks-protocol.md``).

A client asks verifier V to compute the next step of V's *check session*, which mirrors node N's
session from position 0 (same inputs, so V's positions are N's positions), and to compare V's
output with the outputs N claimed for the same steps (a
:class:`~corolla.node.protocol.messages.CheckMessage`). Nothing is computed before the claims
check out; every refusal is typed and leaves the session as it was:

- on the event loop, cheap (:meth:`Verifier.admit`): N's announced profile is V's own; N's
  steps ran V's blocks of V's model; N's requests name the client that signs V's request, one
  session, consecutive steps and positions, from where V's session stands in N's (step 0 and
  the genesis chain the first time, then where the last check ended, with N's chain after it);
  V's request starts at N's position and holds exactly N's tokens; all receipts name one node,
  not V; the claimed outputs have the inputs' shape;
- on the compute thread, before the forward pass (:meth:`Verifier.check_claims`): the client's
  signature on each of N's requests; V's inputs, cut per step, are the ones N's requests name;
  N's receipts are signed by N, bound to its requests, chained from the given previous chain,
  and name the claimed outputs (the digest of each step's slice).

A signature, digest or receipt that does not check out is a
:class:`~corolla.errors.VerificationError` (code ``unverifiable`` on the wire); anything else is
:class:`~corolla.errors.InvalidInput`.

V then runs its step through the node's usual scheduler and session (its KV cache holds N's
earlier inputs, so a later check computes only the new positions), compares under its threshold
(the model's calibrated one for V's profile, from :data:`~corolla.verify.tolerance.
CALIBRATION_FILE` beside the checkpoint if it was measured on this model, else the profile's
default), and signs a :class:`~corolla.verify.verdicts.CheckVerdict` over exactly the steps it
computed: ``first_step`` where it resumed, ``end_step`` after N's last covered step, positions in
request units (batch x tokens), ``recomputed_positions`` its request's tokens, ``node_chain`` N's
chain after the last covered step, ``recomputation_digest`` its own receipt's digest. The
signing goes through the node's :class:`~corolla.node.behaviour.Behaviour` (``judge``), the seam
where a simulated adversary lies.

V does not check the assignment (``beacon_epoch``): it signs the epoch it was told, and the
ledger re-derives the assignment before it counts the verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from corolla.errors import BadReceipt, InvalidInput
from corolla.node.model.span import Span
from corolla.node.protocol.messages import CheckMessage
from corolla.node.sessions import Mirror, Session
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.identity import SIGNATURE_SIZE, Identity
from corolla.verify.receipts import Receipt, verify_receipt, verify_request
from corolla.verify.tolerance import (
    CALIBRATION_FILE,
    Calibration,
    compare,
    load_calibrations,
    profile_of,
    tolerance_for,
)
from corolla.verify.verdicts import CheckVerdict

__all__ = ["Verifier", "read_calibrations"]

logger = logging.getLogger("corolla.node.verifier")


def read_calibrations(directory: str | Path, model_digest: bytes) -> dict[str, Calibration]:
    """The calibrations beside a checkpoint (``directory``), by profile: none if there is no
    :data:`~corolla.verify.tolerance.CALIBRATION_FILE` or it was measured on another model (the
    profiles' defaults then apply). A damaged file raises :class:`InvalidInput`."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    found = load_calibrations(path)
    if any(calibration.model_digest != model_digest for calibration in found.values()):
        logger.warning(
            "%s was measured on another model: this node uses the profiles' default thresholds",
            path,
        )
        return {}
    return found


class Verifier:
    """The checks, threshold and verdict of a node serving ``span`` as a verifier."""

    def __init__(
        self,
        identity: Identity,
        span: Span,
        calibrations: Mapping[str, Calibration] | None = None,
    ) -> None:
        self.identity = identity
        self.span = span
        self.calibrations = {
            profile: calibration
            for profile, calibration in (calibrations or {}).items()
            if calibration.model_digest == span.model_digest
        }

    @property
    def profile(self) -> str:
        """The node's compute profile (fp32, int8, nf4); :class:`InvalidInput` if it has none."""
        return profile_of(str(self.span.dtype), self.span.quant)

    @property
    def threshold(self) -> float:
        calibration = self.calibrations.get(self.profile)
        if calibration is not None:
            return calibration.threshold
        return tolerance_for(self.profile).threshold

    def admit(self, session: Session[Any], check: CheckMessage) -> None:
        """The cheap checks of ``check`` on ``session`` (whose own checks the service made:
        owner, request against the session's blocks, next step); raises before any work."""
        request, requests, receipts = check.request, check.node_requests, check.node_receipts
        if check.profile != self.profile:
            raise InvalidInput(
                f"this verifier computes profile {self.profile}, the checked node "
                f"{check.profile[:16]!r}: a check compares like with like"
            )
        node_key = receipts[0].node_key
        if self.identity.public_key in (node_key, request.client_key):
            raise InvalidInput("a verifier checks neither its own work nor its own request")
        batch, first = session.batch_size, requests[0]
        ours = (request.model_digest, request.span_digest, request.start, request.end)
        position = first.position
        for index, (theirs, receipt) in enumerate(zip(requests, receipts, strict=True)):
            step = first.step + index
            if theirs.client_key != request.client_key:
                raise InvalidInput(f"the node's step {step} was asked by another client")
            if (theirs.model_digest, theirs.span_digest, theirs.start, theirs.end) != ours:
                raise InvalidInput(
                    f"the node's step {step} ran other blocks or another model than this "
                    "check session"
                )
            if theirs.session_id != first.session_id or theirs.step != step:
                raise InvalidInput("a check covers consecutive steps of one session of the node")
            if theirs.tokens % batch:
                raise InvalidInput(f"the node's step {step} is not of this session's batch")
            if theirs.position != position:
                raise InvalidInput(f"the node's step {step} is not at the position after its last")
            position += theirs.tokens
            if receipt.node_key != node_key:
                raise BadReceipt(f"the receipt of step {step} is by another node than the first's")
        self._check_resume(session, check, node_key)
        if request.position != first.position:
            raise InvalidInput(
                f"the check's request is at position {request.position}, the node's step "
                f"{first.step} at {first.position}"
            )
        covered = sum(theirs.tokens for theirs in requests)
        if request.tokens != covered:
            raise InvalidInput(
                f"the check's request holds {request.tokens} tokens, the covered steps {covered}"
            )
        claimed, hidden = check.claimed, check.hidden
        if claimed.shape != hidden.shape or claimed.dtype != hidden.dtype:
            raise InvalidInput(
                f"the claimed outputs {list(claimed.shape)} ({claimed.dtype}) are not shaped "
                f"like the inputs {list(hidden.shape)} ({hidden.dtype})"
            )

    @staticmethod
    def _check_resume(session: Session[Any], check: CheckMessage, node_key: bytes) -> None:
        """The covered steps start where the check session stands in the node's session."""
        first, mirror = check.node_requests[0], session.mirror
        if mirror is None:
            if first.step != 0 or check.previous_chain != GENESIS_CHAIN:
                raise InvalidInput(
                    "a session's first check covers the node's steps from step 0 (previous "
                    "chain: the genesis chain)"
                )
            return
        if (node_key, first.session_id) != (mirror.node_key, mirror.session_id):
            raise InvalidInput("this check session mirrors another session of another node")
        if first.step != mirror.next_step:
            raise InvalidInput(
                f"this check session resumes at the node's step {mirror.next_step}, not at "
                f"step {first.step}"
            )
        if check.previous_chain != mirror.chain:
            raise InvalidInput("the previous chain is not the node's chain after the last check")

    def check_claims(self, check: CheckMessage) -> None:
        """Signatures and digests of the node's claims (costly: on the compute thread, before
        the forward pass). Raises :class:`~corolla.errors.VerificationError` or
        :class:`InvalidInput`."""
        batch, offset, chain = check.hidden.shape[0], 0, check.previous_chain
        node_key = check.node_receipts[0].node_key
        for theirs, receipt in zip(check.node_requests, check.node_receipts, strict=True):
            verify_request(theirs)
            window = slice(offset, offset + theirs.tokens // batch)
            if tensor_digest(check.hidden[:, window]) != theirs.input_digest:
                raise InvalidInput(
                    f"the check's inputs are not the node's inputs of its step {theirs.step}"
                )
            verify_receipt(
                receipt,
                request=theirs,
                output=check.claimed[:, window],
                previous_chain=chain,
                node_key=node_key,
            )
            chain, offset = receipt.chain_digest, window.stop

    def verdict(self, check: CheckMessage, receipt: Receipt, output: torch.Tensor) -> CheckVerdict:
        """The unsigned verdict of comparing the node's claims with ``output`` (this node's
        recomputation, named by its ``receipt``)."""
        comparison = compare(check.claimed, output, self.profile, self.threshold)
        request, first, last = check.request, check.node_requests[0], check.node_requests[-1]
        return CheckVerdict(
            verifier_key=self.identity.public_key,
            client_key=request.client_key,
            node_key=check.node_receipts[0].node_key,
            model_digest=request.model_digest,
            span_digest=request.span_digest,
            node_chain=check.node_receipts[-1].chain_digest,
            recomputation_digest=receipt.digest(),
            session_id=first.session_id,
            start=request.start,
            end=request.end,
            first_step=first.step,
            end_step=last.step + 1,
            first_position=first.position,
            end_position=last.position + last.tokens,
            beacon_epoch=check.beacon_epoch,
            recomputed_positions=request.tokens,
            profile=comparison.profile,
            score=repr(comparison.score),
            threshold=repr(comparison.threshold),
            passed=comparison.passed,
            signature=bytes(SIGNATURE_SIZE),
        )

    @staticmethod
    def mirror_after(check: CheckMessage) -> Mirror:
        """Where the check session stands in the node's session once ``check`` is done."""
        last = check.node_requests[-1]
        return Mirror(
            node_key=check.node_receipts[0].node_key,
            session_id=last.session_id,
            next_step=last.step + 1,
            chain=check.node_receipts[-1].chain_digest,
        )
