"""What a node checks of a step before it computes anything: functions of the request, its hidden
states, the node's span and the session, which change no state and raise
:class:`~corolla.errors.InvalidInput` with the reason.

:class:`~corolla.node.service.NodeService` calls them in this order (the client's signature is
checked before any of them, and a retry of the session's last step gets its stored reply before
the per-step checks):

- at ``open``: :func:`check_open` (the blocks asked for, the length the model allows);
- per session step: :func:`check_session_owner`, then :func:`check_request` (version, model,
  blocks, span digest, hidden states, token count), then :func:`check_next_step` (batch,
  position, room left);
- per one-shot forward: :func:`requested_span`, :func:`check_request`, :func:`check_one_shot`;
- on the compute thread, last: :func:`check_input` (the digest the client signed, finiteness).
"""

from __future__ import annotations

from typing import Any

import torch

from corolla.errors import InvalidInput
from corolla.node.model.span import Span
from corolla.node.protocol.messages import OpenSession
from corolla.node.sessions import Session
from corolla.verify.digests import tensor_digest
from corolla.verify.receipts import StepRequest
from corolla.version import PROTOCOL_VERSION

__all__ = [
    "check_input",
    "check_next_step",
    "check_one_shot",
    "check_open",
    "check_request",
    "check_session_owner",
    "requested_span",
]


def requested_span(span: Span, start: int, end: int) -> Span:
    """The node's ``span``, or the part ``[start, end)`` of it that a client asks for."""
    if not span.start <= start < end <= span.end:
        raise InvalidInput(
            f"this node serves blocks [{span.start}, {span.end}), not [{start}, {end})"
        )
    return span.subspan(start, end)


def check_open(request: OpenSession, span: Span) -> Span:
    """The blocks a session opened with ``request`` runs, if the node can serve it."""
    blocks = requested_span(span, request.start, request.end)
    if request.max_length > blocks.max_length:
        raise InvalidInput(
            f"max_length {request.max_length} exceeds the model's {blocks.max_length}"
        )
    return blocks


def check_request(request: StepRequest, hidden: torch.Tensor, span: Span) -> tuple[int, int]:
    """A request against the blocks it runs; returns (batch, tokens per sequence)."""
    if request.protocol_version != PROTOCOL_VERSION:
        raise InvalidInput(f"protocol version {request.protocol_version} is not supported")
    if request.model_digest != span.model_digest:
        raise InvalidInput("the request names another model than this node serves")
    if (request.start, request.end) != (span.start, span.end):
        raise InvalidInput(f"the request names blocks other than [{span.start}, {span.end})")
    if request.span_digest != span.digest:
        raise InvalidInput("the request's span digest differs from this node's span")
    span.check_hidden(hidden)
    batch, new = hidden.shape[0], hidden.shape[1]
    if request.tokens != batch * new:
        raise InvalidInput(
            f"request claims {request.tokens} tokens, hidden states hold {batch * new}"
        )
    return batch, new


def check_session_owner(session: Session[Any], request: StepRequest) -> None:
    """The request belongs to ``session``: its id, signed by the client that opened it."""
    if request.session_id != session.session_id:
        raise InvalidInput("unknown session: the request names a session not open on this stream")
    if request.client_key != session.client_key:
        raise InvalidInput("the request is signed by another client than the session's")


def check_next_step(session: Session[Any], request: StepRequest, batch: int, new: int) -> None:
    """``request`` (``batch`` sequences of ``new`` tokens) continues ``session`` where it is."""
    if batch != session.batch_size:
        raise InvalidInput(f"batch of {batch} sent to a session of batch {session.batch_size}")
    if request.position != session.position:
        raise InvalidInput(
            f"request is at position {request.position}, the session at {session.position}"
        )
    if session.past_length + new > session.max_length:
        raise InvalidInput(
            f"{session.past_length} + {new} tokens exceed the session's max length "
            f"of {session.max_length}"
        )


def check_one_shot(request: StepRequest, new: int, span: Span) -> None:
    """A one-shot forward of ``new`` tokens per sequence: from position 0, within the context."""
    if request.position != 0:
        raise InvalidInput("a one-shot forward starts at position 0")
    if new > span.max_length:
        raise InvalidInput(f"{new} tokens exceed the model's context of {span.max_length}")


def check_input(request: StepRequest, hidden: torch.Tensor) -> None:
    """The hidden states are the ones the client signed, and finite (costly: compute thread)."""
    if tensor_digest(hidden) != request.input_digest:
        raise InvalidInput("the hidden states do not match the request's input digest")
    if not bool(torch.isfinite(hidden).all()):
        raise InvalidInput("the hidden states contain NaN or infinity")
