"""All blocks in this process: spans chained with their caches, no network.

The reference backbone: the swarm must give the same tokens as this.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from corolla.client.generation import Draw, TokenRange
from corolla.errors import InvalidInput, SessionError, SpanOutOfRange
from corolla.node.model.span import Span, SpanCache, load_span

__all__ = ["LocalBackbone", "LocalSession", "even_splits"]


def even_splits(num_blocks: int, num_spans: int) -> list[tuple[int, int]]:
    """Split blocks [0, num_blocks) into `num_spans` contiguous spans of near-equal size."""
    if not 1 <= num_spans <= num_blocks:
        raise InvalidInput(f"cannot split {num_blocks} blocks into {num_spans} spans")
    bounds = [round(i * num_blocks / num_spans) for i in range(num_spans + 1)]
    return list(itertools.pairwise(bounds))


class LocalSession:
    def __init__(self, spans: Sequence[Span], batch_size: int, max_length: int) -> None:
        self._spans = spans
        self._caches: list[SpanCache] | None = [span.new_cache(batch_size) for span in spans]
        self._max_length = max_length

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._caches is None:
            raise SessionError("this inference session is closed")
        if self._caches[0].past_length + hidden.shape[1] > self._max_length:
            raise SessionError(f"the session's max_length of {self._max_length} is exceeded")
        for span, cache in zip(self._spans, self._caches, strict=True):
            hidden = span.forward(hidden, cache)  # batch, new, hidden
        return hidden

    def finish(self) -> None:
        """Nothing to settle: local spans are trusted."""

    def drew(self, draw: Draw) -> None:
        """Nothing to check later: local spans are trusted."""

    def unverified(self) -> tuple[TokenRange, ...]:
        """None: every block ran in this process."""
        return ()

    def close(self) -> None:
        self._caches = None


class LocalBackbone:
    """A chain of locally loaded spans covering every block."""

    def __init__(self, spans: Sequence[Span]) -> None:
        if not spans:
            raise InvalidInput("a backbone needs at least one span")
        expected = 0
        for span in spans:
            if span.start != expected:
                raise SpanOutOfRange(f"spans must be contiguous from block 0; gap at {expected}")
            expected = span.end
        self.spans = list(spans)
        self.num_blocks = expected

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        splits: Sequence[tuple[int, int]],
        quant: str | None = None,
    ) -> LocalBackbone:
        return cls([load_span(model_dir, start, end, quant) for start, end in splits])

    @contextmanager
    def inference_session(self, batch_size: int, max_length: int) -> Iterator[LocalSession]:
        session = LocalSession(self.spans, batch_size, max_length)
        try:
            yield session
        finally:
            session.close()
