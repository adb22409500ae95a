"""The ledger's referee: its own recomputation of an accused span, from the model on disk
(``corolla ledger serve --referee-model DIR``, ``corolla ledger audit --referee-model DIR``).

It loads blocks ``[start, end)`` of the model with the profile's quantization (a node's own span
loader: the ledger never imports this module; the command root hands it to the ledger as a
:data:`~corolla.verify.referee.RefereeFactory`), checks that the model and span digests are the
ones the accused's receipts name, and runs the accused's whole input prefix in one forward call.

- :meth:`Referee.judge` decides a :class:`~corolla.verify.disputes.Dispute` (checks v2): it
  checks the dispute (:func:`~corolla.verify.disputes.check_dispute`), recomputes, and hands
  its output to :func:`~corolla.verify.disputes.judge_dispute` with the model's calibrated
  threshold and honest floor for the profile (:data:`~corolla.verify.tolerance.CALIBRATION_FILE`
  beside the checkpoint, if it was measured on this model; otherwise the profile's default
  threshold and a floor of a tenth of it, see :data:`DEFAULT_FLOOR_RATIO`) and, when the span
  ends at the model's last block, the model's head (final norm, LM head, argmax) for the head
  rule. It returns the :class:`~corolla.verify.disputes.Judgment`, or a ``declined``
  :class:`~corolla.verify.referee.RefereeFinding` saying why it cannot judge.
- :meth:`Referee.review` judges version 1 :class:`~corolla.verify.evidence.FraudEvidence`
  (the node's claims against the profile's default threshold), until the ledger switches.

Its work is bounded: at most ``max_tokens`` (batch x tokens) positions per recomputation, one
recomputation at a time, a few loaded spans kept, the head loaded once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from corolla.errors import CorollaError
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.families import Head
from corolla.node.model.head import read_head
from corolla.node.model.manifest import load_manifest
from corolla.node.model.span import Span, load_span
from corolla.node.verifier import read_calibrations
from corolla.verify.disputes import Dispute, Judgment, check_dispute, judge_dispute
from corolla.verify.receipts import StepRequest
from corolla.verify.referee import RefereeConfig, RefereeFinding
from corolla.verify.tolerance import DEFAULT_FLOOR_RATIO, Tolerance, compare, tolerance_for

__all__ = ["DEFAULT_FLOOR_RATIO", "Referee"]

_log = logging.getLogger("corolla.node.referee")

"""Without a calibration, the honest floor is the profile's default threshold divided by this:
the defaults were set at least 10x above the largest honest score measured
(:mod:`corolla.verify.tolerance`), so the floor stays above every honest score measured."""


class Referee:
    """Recomputes accused spans of one model (thread-safe; one recomputation at a time)."""

    def __init__(self, config: RefereeConfig) -> None:
        self.config = config
        self._checkpoint = Checkpoint(config.model_dir)
        self._manifest = load_manifest(self._checkpoint)
        self.model_digest: bytes = self._manifest.model_digest
        self.calibrations = read_calibrations(self._checkpoint.directory, self.model_digest)
        self._lock = threading.Lock()
        self._spans: OrderedDict[tuple[int, int, str], Span] = OrderedDict()
        self._head: Head | None = None

    # ----------------------------------------------------------------- checks v2: disputes

    def judge(self, dispute: Dispute) -> Judgment | RefereeFinding:
        """Decide ``dispute``: who lied, by the referee's own recomputation of the prefix.

        Raises :class:`~corolla.errors.VerificationError` or :class:`InvalidInput` for a
        dispute that is not sound (it accuses nobody); a ``declined`` finding when this referee
        cannot judge it (another model, too much work)."""
        check_dispute(dispute)
        claim = dispute.claims[0].request
        tolerance, declined = self._can_judge(claim, dispute.profile, dispute.prefix)
        if declined is not None:
            return declined
        threshold, floor = self.rules(dispute.profile)
        try:
            with self._lock:
                span = self._span(claim.start, claim.end, tolerance.quant)
                reference = span.forward(dispute.prefix)
                head = self._head_rule() if claim.end == self._checkpoint.num_blocks else None
                judgment = judge_dispute(dispute, reference, threshold, floor, head)
        except CorollaError as error:
            return _declined(f"the referee could not run the accused's inputs: {error}")
        _log.info(
            "referee: node %s (%s); verifiers lied: %d",
            "lied" if judgment.node_lied else "honest",
            judgment.node_reason,
            len(judgment.lying_verifiers),
        )
        return judgment

    def rules(self, profile: str) -> tuple[float, float]:
        """(threshold, honest floor) the referee applies to ``profile`` on its model."""
        calibration = self.calibrations.get(profile)
        if calibration is not None:
            return calibration.threshold, calibration.honest_floor
        threshold = tolerance_for(profile).threshold
        return threshold, threshold / DEFAULT_FLOOR_RATIO

    # ----------------------------------------------------------------- checks v1: evidence

    def review(self, evidence: Any) -> RefereeFinding:
        """Recompute the accused's span over the evidence's prefix and compare its claims.

        ``evidence`` is a ``FraudEvidence`` that passed ``check_evidence``. The finding is
        ``declined`` (with why) when this referee cannot judge it."""
        claim = evidence.claims[0].request
        tolerance, declined = self._can_judge(claim, evidence.profile, evidence.prefix)
        if declined is not None:
            return declined
        try:
            with self._lock:
                span = self._span(claim.start, claim.end, tolerance.quant)
                output = span.forward(evidence.prefix)
        except CorollaError as error:
            return _declined(f"the referee could not run the accused's inputs: {error}")
        comparison = compare(evidence.claimed, output, evidence.profile)
        _log.info("referee: %s", comparison.describe())
        return RefereeFinding(
            "passed" if comparison.passed else "failed", repr(comparison.score), ""
        )

    # ----------------------------------------------------------------- shared

    def _can_judge(
        self, claim: StepRequest, profile: str, prefix: torch.Tensor
    ) -> tuple[Tolerance, RefereeFinding | None]:
        """The profile's tolerance, and a declined finding if this referee cannot judge."""
        tolerance = tolerance_for(profile)
        if claim.model_digest != self.model_digest:
            return tolerance, _declined("the referee does not host the accused's model")
        if not 0 <= claim.start < claim.end <= self._checkpoint.num_blocks:
            return tolerance, _declined("the accused's blocks are outside the referee's model")
        if claim.span_digest != self._manifest.span_digest(claim.start, claim.end):
            return tolerance, _declined("the accused's span digest is not the referee model's")
        if tolerance.dtype != "float32":
            return tolerance, _declined(f"the referee computes float32, not {tolerance.dtype}")
        positions = prefix.shape[0] * prefix.shape[1]  # batch x tokens
        if positions > self.config.max_tokens:
            return tolerance, _declined(
                f"the evidence needs {positions} positions recomputed; the referee runs at "
                f"most {self.config.max_tokens}"
            )
        return tolerance, None

    def _span(self, start: int, end: int, quant: str) -> Span:
        key = (start, end, quant)
        span = self._spans.get(key)
        if span is None:
            span = load_span(self.config.model_dir, start, end, quant)
            self._spans[key] = span
            while len(self._spans) > self.config.cached_spans:
                self._spans.popitem(last=False)
        self._spans.move_to_end(key)
        return span

    def _head_rule(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """hidden [..., hidden] -> the greedy token ids [...], with the model's own head."""
        if self._head is None:
            self._head = read_head(self._checkpoint, self._manifest)
        head = self._head

        def greedy(hidden: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return head.logits(hidden).argmax(dim=-1)

        return greedy


def _declined(note: str) -> RefereeFinding:
    return RefereeFinding("declined", "", note)
