"""The ledger's referee: its own recomputation of an accused span, from the model on disk
(``corolla ledger serve --referee-model DIR``, ``corolla ledger audit --referee-model DIR``).

It loads blocks ``[start, end)`` of the model with the evidence profile's quantization (a node's own
span loader: the ledger never imports this module; the command root hands it to the ledger as a
:data:`~corolla.verify.referee.RefereeFactory`), checks that the model and span digests are the ones
the accused's receipts name, runs the accused's whole input prefix in one forward call, and compares
the accused's claimed outputs with its own under the profile's measured tolerance. Its work is
bounded: at most ``max_tokens`` (batch x tokens) per piece of evidence, one recomputation at a time,
a few loaded spans kept. """

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from corolla.errors import CorollaError
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import load_manifest
from corolla.node.model.span import load_span
from corolla.verify.referee import RefereeConfig, RefereeFinding
from corolla.verify.tolerance import compare, tolerance_for

__all__ = ["Referee"]

_log = logging.getLogger("corolla.node.referee")


class Referee:
    """Recomputes accused spans of one model (thread-safe; one recomputation at a time)."""

    def __init__(self, config: RefereeConfig) -> None:
        self.config = config
        self._checkpoint = Checkpoint(config.model_dir)
        self._manifest = load_manifest(self._checkpoint)
        self.model_digest: bytes = self._manifest.model_digest
        self._lock = threading.Lock()
        self._spans: OrderedDict[tuple[int, int, str], Any] = OrderedDict()

    def review(self, evidence: Any) -> RefereeFinding:
        """Recompute the accused's span over the evidence's prefix and compare its claims.

        ``evidence`` is a ``FraudEvidence`` that passed ``check_evidence``. The finding is
        ``declined`` (with why) when this referee cannot judge it."""
        claim = evidence.claims[0].request
        if claim.model_digest != self.model_digest:
            return _declined("the referee does not host the accused's model")
        if not 0 <= claim.start < claim.end <= self._checkpoint.num_blocks:
            return _declined("the accused's blocks are outside the referee's model")
        if claim.span_digest != self._manifest.span_digest(claim.start, claim.end):
            return _declined("the accused's span digest is not the referee model's")
        tolerance = tolerance_for(evidence.profile)
        if tolerance.dtype != "float32":
            return _declined(f"the referee computes float32, not {tolerance.dtype}")
        prefix = evidence.prefix  # batch, all tokens, hidden
        positions = prefix.shape[0] * prefix.shape[1]
        if positions > self.config.max_tokens:
            return _declined(
                f"the evidence needs {positions} positions recomputed; the referee runs at "
                f"most {self.config.max_tokens}"
            )
        try:
            with self._lock:
                span = self._span(claim.start, claim.end, tolerance.quant)
                output = span.forward(prefix)
        except CorollaError as error:
            return _declined(f"the referee could not run the accused's inputs: {error}")
        comparison = compare(evidence.claimed, output, evidence.profile)
        _log.info("referee: %s", comparison.describe())
        return RefereeFinding(
            "passed" if comparison.passed else "failed", repr(comparison.score), ""
        )

    def _span(self, start: int, end: int, quant: str) -> Any:
        key = (start, end, quant)
        span = self._spans.get(key)
        if span is None:
            span = load_span(self.config.model_dir, start, end, quant)
            self._spans[key] = span
            while len(self._spans) > self.config.cached_spans:
                self._spans.popitem(last=False)
        self._spans.move_to_end(key)
        return span


def _declined(note: str) -> RefereeFinding:
    return RefereeFinding("declined", "", note)
