"""What a referee is to the rest of Corolla: something that recomputes an accused span and
says whether the claims match (the ledger's operator runs one, :mod:`corolla.node.referee`;
an auditor may run its own). Torch-free, so the ledger imports it without loading a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corolla.errors import InvalidInput

__all__ = ["RefereeConfig", "RefereeFactory", "RefereeFinding", "RefereeLike"]


@dataclass(frozen=True, slots=True)
class RefereeFinding:
    """What the referee's own recomputation of the accused's span showed."""

    status: str
    """``passed`` (the claims are within the profile's tolerance of the referee's output),
    ``failed``, or ``declined`` (the referee cannot judge this evidence: another model, too
    much work)."""
    score: str
    """The comparison's score, as text (empty when declined)."""
    note: str
    """Why the referee declined (empty otherwise)."""


class RefereeLike(Protocol):
    """Recomputes an accused span (the ledger's referee, or an auditor's stand-in)."""

    def review(self, evidence: Any) -> RefereeFinding:
        """The finding on ``evidence`` (a ``FraudEvidence`` that passed ``check_evidence``)."""
        ...

    def judge(self, dispute: Any) -> Any:
        """The :class:`~corolla.verify.disputes.Judgment` of ``dispute`` (a ``Dispute`` that
        passed ``check_dispute``), or a declined :class:`RefereeFinding` saying why not."""
        ...


@dataclass(frozen=True, slots=True)
class RefereeConfig:
    """Where the referee's model is and how much work one piece of evidence may ask of it."""

    model_dir: Path
    max_tokens: int = 8192
    """Most (batch x tokens) positions one recomputation may run."""
    cached_spans: int = 4
    """Loaded spans kept in memory (a span is loaded on first use)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.cached_spans < 1:
            raise InvalidInput("the referee's max_tokens and cached_spans must be positive")


RefereeFactory = Callable[[RefereeConfig], RefereeLike]
"""Builds a referee from its config (the command root passes the node's referee)."""
