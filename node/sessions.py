"""The node's table of inference sessions: KV caches within a token budget, idempotent steps.

A session reserves ``batch_size * max_length`` cache tokens when it opens and gives them back when
it closes; a session that does not fit is refused with :class:`~corolla.errors.NodeBusy`. Steps
are numbered from 0 and must come in order: the next step advances the cache; a retry of the last
step (the same signed request) gets the stored reply back without touching the cache; anything
else is refused. ``position`` counts the tokens already in the cache over the whole batch
(``batch_size * past_length``), as :class:`~corolla.verify.receipts.StepRequest` does.

A session that has taken a check step (:mod:`corolla.node.verifier`) is a *check session*: it
mirrors another node's session (:class:`Mirror`) and takes only check steps from then on.

A session opened with a ticket the node honours holds it (``ticket``, see
:mod:`corolla.node.ticket_book`) and runs at high priority until the ticket can no longer pay for a
step; it then drops the ticket and runs free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from corolla.errors import InvalidInput, NodeBusy
from corolla.node.model.span import Span, SpanCache
from corolla.node.ticket_book import HonouredTicket
from corolla.verify.digests import GENESIS_CHAIN
from corolla.verify.receipts import StepRequest

__all__ = ["Mirror", "Session", "SessionConfig", "SessionTable"]

Reply = TypeVar("Reply")


@dataclass(frozen=True)
class SessionConfig:
    """Limits of the session table."""

    max_cache_tokens: int = 32768
    """Cache tokens (summed over every session's batch) the node holds at most."""
    idle_timeout: float = 60.0
    """Seconds a session may wait for its next message before it is closed (by the service,
    which waits for each message with this timeout)."""


@dataclass(frozen=True)
class Mirror:
    """Where a check session stands in the session it mirrors (node ``node_key``'s session
    ``session_id``): the checked node's next uncovered step and its chain digest before it."""

    node_key: bytes
    session_id: bytes
    next_step: int
    chain: bytes


@dataclass
class Session(Generic[Reply]):
    """One client's session on this node: the blocks it runs, its cache, position, last reply."""

    session_id: bytes
    client_key: bytes
    batch_size: int
    max_length: int
    span: Span
    """The blocks this session runs: the node's span or a part of it."""
    cache: SpanCache
    next_step: int = 0
    chain: bytes = GENESIS_CHAIN
    last_request: StepRequest | None = None
    last_reply: Reply | None = None
    ticket: HonouredTicket | None = None
    """The ticket paying for this session's priority; None: the session runs free."""
    mirror: Mirror | None = None
    """Set by the first check step: the session checks another node's session."""

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length

    @property
    def past_length(self) -> int:
        """Tokens per sequence already in the cache."""
        return self.cache.past_length

    @property
    def position(self) -> int:
        """Tokens already in the cache over the whole batch."""
        return self.batch_size * self.cache.past_length

    def replay_of(self, request: StepRequest) -> Reply | None:
        """The stored reply if ``request`` retries the last step; ``None`` if it is the next step.

        Raises :class:`InvalidInput` for a step that skips ahead, an older step, or a retry that
        differs from the request it repeats.
        """
        if request.step == self.next_step:
            return None
        last = self.last_request
        if last is not None and request.step == last.step:
            if request.digest() != last.digest():
                raise InvalidInput(f"step {request.step} was already done with another request")
            return self.last_reply
        if request.step > self.next_step:
            raise InvalidInput(
                f"step {request.step} skips ahead: the session expects step {self.next_step}"
            )
        raise InvalidInput(
            f"step {request.step} is long done: the session expects step {self.next_step}"
        )

    def advance(self, request: StepRequest, reply: Reply, chain: bytes) -> None:
        """Record a completed step (its cache was advanced by the forward pass)."""
        self.next_step = request.step + 1
        self.chain = chain
        self.last_request = request
        self.last_reply = reply


class SessionTable(Generic[Reply]):
    """Open sessions and the cache tokens they reserve."""

    def __init__(self, config: SessionConfig) -> None:
        if config.max_cache_tokens < 0 or config.idle_timeout <= 0:
            raise InvalidInput("max_cache_tokens must be >= 0 and idle_timeout > 0")
        self.config = config
        self._sessions: dict[bytes, Session[Reply]] = {}

    @property
    def used_tokens(self) -> int:
        return sum(session.reserved_tokens for session in self._sessions.values())

    @property
    def free_tokens(self) -> int:
        return self.config.max_cache_tokens - self.used_tokens

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: bytes) -> bool:
        return session_id in self._sessions

    def open(
        self,
        session_id: bytes,
        client_key: bytes,
        batch_size: int,
        max_length: int,
        span: Span,
        ticket: HonouredTicket | None = None,
    ) -> Session[Reply]:
        """Reserve room for a new session running ``span``; :class:`NodeBusy` if it does not fit."""
        if session_id in self._sessions:
            raise InvalidInput("a session with this id is already open on this node")
        wanted = batch_size * max_length
        if wanted > self.free_tokens:
            raise NodeBusy(
                f"no room for a session of {batch_size} x {max_length} = {wanted} cache tokens: "
                f"{self.free_tokens} of {self.config.max_cache_tokens} free"
            )
        session: Session[Reply] = Session(
            session_id,
            client_key,
            batch_size,
            max_length,
            span,
            span.new_cache(batch_size),
            ticket=ticket,
        )
        self._sessions[session_id] = session
        return session

    def get(self, session_id: bytes) -> Session[Reply]:
        session = self._sessions.get(session_id)
        if session is None:
            raise InvalidInput("unknown session: it is not open on this node")
        return session

    def close(self, session: Session[Reply]) -> None:
        """Forget ``session`` and free its cache (idempotent). A newer session that reuses its id
        after it was closed is left alone."""
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
