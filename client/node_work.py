"""One node's session inside a client's session: its signed steps and how far they are verified.

A :class:`NodeWork` is kept for every node a session sends steps to (replaced and rewound ones
included, until the session ends): the node's signed claims (request, receipt, input, output),
when each receipt arrived (a check's beacon epoch must begin after it), the tokens drawn from
its outputs when it ends the route (the head rule needs them), and the leading steps a check has
verified. Checks, disputes and the unverified-token count all read it; the session writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corolla.client.generation import Draw
from corolla.client.routing import Hop
from corolla.verify.digests import GENESIS_CHAIN
from corolla.verify.evidence import StepClaim

__all__ = ["NodeWork"]


@dataclass(eq=False)
class NodeWork:
    """Node ``hop.record``'s session ``session_id`` on blocks ``[hop.start, hop.end)``."""

    hop: Hop
    session_id: bytes
    generation: int
    """Which of the session's rewinds it belongs to (0 before the first): a rewind replays the
    kept prefix on fresh node-sessions, so tokens drawn after it depend only on work of its own
    generation."""
    claims: list[StepClaim] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    """The per-sequence position of each step's first token."""
    received: list[float] = field(default_factory=list)
    """Wall-clock time each step's receipt arrived."""
    draws: dict[int, Draw] = field(default_factory=dict)
    """Step -> the tokens drawn from its last output position (only when it ended the route)."""
    verified: int = 0
    """Leading steps covered by a passed check (or by the referee's judgment)."""
    scheduled: int = 0
    """Leading steps covered by a check scheduled so far (0: none)."""
    in_flight: bool = False
    """A check of it runs (one at a time: a verifier's check session takes them in order)."""
    wanted: int = 0
    """Leading steps a check was asked for while another ran (scheduled when it ends)."""
    disputed: bool = False
    """A check failed and its dispute is not judged yet: no further check counts."""
    why_unverified: str = ""
    """Why its unverified steps are unverified, once that is known."""

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id

    @property
    def node_key(self) -> bytes:
        return self.hop.record.public_key

    @property
    def steps(self) -> int:
        return len(self.claims)

    def chain_before(self, step: int) -> bytes:
        """The node's chain digest before ``step`` (after step ``step - 1``)."""
        return GENESIS_CHAIN if step == 0 else self.claims[step - 1].receipt.chain_digest

    def add(self, claim: StepClaim, start: int, received: float) -> None:
        self.claims.append(claim)
        self.starts.append(start)
        self.received.append(received)
