"""The node wire protocol's messages: kinds, handler names, and the typed messages.

Typed messages (:class:`OpenSession`, :class:`SessionOpened`, :class:`StepMessage`,
:class:`StepOutput`, :class:`CheckMessage`, :class:`CheckOutput`, :class:`ErrorReply`,
:class:`NodeInfo`) convert to and from the generic :class:`~corolla.node.protocol.tensors.Message`
and validate every field. How a message becomes protobuf parts (tensor encoding, chunking,
strict decoding) is in :mod:`corolla.node.protocol.tensors`; the raw client
(:func:`request_info`, :func:`request_forward`, :class:`InferenceStream`) in
:mod:`corolla.node.protocol.stream`.

A node serves three libp2p handlers, named as hivemind's ``ServicerBase`` names a method of a
service class ``NodeService`` in namespace ``corolla`` (``corolla::NodeService.rpc_info``). The
names are fixed protocol constants: a node registers them whatever its service class is called.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from corolla.errors import (
    CorollaError,
    InvalidInput,
    NodeBusy,
    NodeError,
    RemoteError,
    VerificationError,
)
from corolla.node.protocol.tensors import Message
from corolla.verify.digests import DIGEST_SIZE
from corolla.verify.encoding import INT_MAX, Value
from corolla.verify.identity import PUBLIC_KEY_SIZE
from corolla.verify.receipts import SESSION_ID_SIZE, Receipt, StepRequest
from corolla.verify.verdicts import CheckVerdict
from corolla.version import PROTOCOL_VERSION

__all__ = [
    "HANDLE_FORWARD",
    "HANDLE_INFERENCE",
    "HANDLE_INFO",
    "KIND_CHECK",
    "KIND_CHECKED",
    "KIND_ERROR",
    "KIND_FORWARD",
    "KIND_INFO",
    "KIND_OPEN",
    "KIND_OPENED",
    "KIND_OUTPUT",
    "KIND_STEP",
    "MAX_CHECK_STEPS",
    "NAMESPACE",
    "PRIORITIES",
    "PRIORITY_FREE",
    "PRIORITY_HIGH",
    "SERVICE_NAME",
    "CheckMessage",
    "CheckOutput",
    "ErrorCode",
    "ErrorReply",
    "NodeInfo",
    "OpenSession",
    "SessionOpened",
    "StepMessage",
    "StepOutput",
    "handle_name",
]

NAMESPACE = "corolla"
SERVICE_NAME = "NodeService"

KIND_OPEN = "open"
KIND_OPENED = "opened"
KIND_STEP = "step"
KIND_OUTPUT = "output"
KIND_FORWARD = "forward"
KIND_INFO = "info"
KIND_ERROR = "error"
KIND_CHECK = "check"
KIND_CHECKED = "checked"

MAX_CHECK_STEPS = 256
"""Most of the checked node's steps one check step covers (a longer catch-up is sent as several
checks, each resuming where the last ended); keeps a check's records within the wire's metadata
limit."""

PRIORITY_HIGH = "high"
"""A session whose ticket the node honours: its steps go ahead of free ones."""
PRIORITY_FREE = "free"
PRIORITIES = (PRIORITY_HIGH, PRIORITY_FREE)


def handle_name(method: str) -> str:
    """The libp2p handler name of the node's ``method`` (``corolla::NodeService.<method>``)."""
    return f"{NAMESPACE}::{SERVICE_NAME}.{method}"


HANDLE_INFO = handle_name("rpc_info")
HANDLE_FORWARD = handle_name("rpc_forward")
HANDLE_INFERENCE = handle_name("rpc_inference")


# --------------------------------------------------------------------------- typed messages


class ErrorCode:
    """Why a node refused: ``busy`` becomes :class:`NodeBusy`, the rest :class:`RemoteError`.

    ``unverifiable``: a signature, digest or receipt the message carries does not check out
    (:class:`~corolla.errors.VerificationError` on the node), e.g. the checked node's receipts in
    a check step; ``invalid``: any other refusal of the message."""

    BUSY = "busy"
    INVALID = "invalid"
    UNVERIFIABLE = "unverifiable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    ALL = (BUSY, INVALID, UNVERIFIABLE, TIMEOUT, INTERNAL)


_MAX_ERROR_TEXT = 2000
_MAX_TICKET_BYTES = 4096
_MAX_NAME = 200
_MAX_NOTE = 500


@dataclass(frozen=True)
class OpenSession:
    """Client -> node, first message of an inference stream: reserve a KV cache."""

    session_id: bytes
    batch_size: int
    max_length: int
    start: int
    end: int
    client_key: bytes
    ticket: bytes | None = None

    def __post_init__(self) -> None:
        _check_bytes("session_id", self.session_id, SESSION_ID_SIZE)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("max_length", self.max_length, 1)
        _check_int("start", self.start, 0)
        _check_int("end", self.end, self.start + 1)
        _check_bytes("client_key", self.client_key, PUBLIC_KEY_SIZE)
        if self.ticket is not None:
            _check_bytes("ticket", self.ticket, None, _MAX_TICKET_BYTES)

    def to_message(self) -> Message:
        return Message(KIND_OPEN, _fields_of(self))

    @classmethod
    def from_message(cls, message: Message) -> OpenSession:
        return cls(**_body(message, KIND_OPEN, cls.__dataclass_fields__, tensors=0))


@dataclass(frozen=True)
class SessionOpened:
    """Node -> client: the session is open and ``reserved_tokens`` of cache are held for it.

    ``priority`` is ``high`` when the node honours the session's ticket, else ``free``; ``note``
    says why (empty for a session opened without a ticket). Both may be absent from the body
    (a node of an earlier version): they then read as ``free`` and ``""``.
    """

    session_id: bytes
    batch_size: int
    max_length: int
    reserved_tokens: int
    priority: str = PRIORITY_FREE
    note: str = ""

    def __post_init__(self) -> None:
        _check_bytes("session_id", self.session_id, SESSION_ID_SIZE)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("max_length", self.max_length, 1)
        _check_int("reserved_tokens", self.reserved_tokens, 0)
        if self.priority not in PRIORITIES:
            raise InvalidInput(f"priority must be one of {PRIORITIES}, not {self.priority!r}"[:200])
        _check_note(self.note)

    def to_message(self) -> Message:
        return Message(KIND_OPENED, _fields_of(self))

    @classmethod
    def from_message(cls, message: Message) -> SessionOpened:
        required = ("session_id", "batch_size", "max_length", "reserved_tokens")
        body = _body(message, KIND_OPENED, required, tensors=0, optional=("priority", "note"))
        return cls(**body)


@dataclass(frozen=True)
class StepMessage:
    """Client -> node: a signed request and its hidden states [batch, tokens, hidden].

    Sent as kind ``step`` on an inference stream, or as kind ``forward`` to ``rpc_forward``.
    """

    request: StepRequest
    hidden: torch.Tensor

    def to_message(self, kind: str = KIND_STEP) -> Message:
        return Message(kind, {"request": self.request.to_bytes()}, (self.hidden,))

    @classmethod
    def from_message(cls, message: Message, kind: str = KIND_STEP) -> StepMessage:
        body = _body(message, kind, ["request"], tensors=1)
        return cls(StepRequest.from_bytes(body["request"]), message.tensors[0])


@dataclass(frozen=True)
class StepOutput:
    """Node -> client: the output hidden states and the node's signed receipt for them.

    ``note`` (sent only when not empty) tells the client something about the step that is not
    an error, e.g. that it ran at free priority because the session's ticket ran out.
    """

    receipt: Receipt
    hidden: torch.Tensor
    note: str = ""

    def __post_init__(self) -> None:
        _check_note(self.note)

    def to_message(self) -> Message:
        body: dict[str, Value] = {"receipt": self.receipt.to_bytes()}
        if self.note:
            body["note"] = self.note
        return Message(KIND_OUTPUT, body, (self.hidden,))

    @classmethod
    def from_message(cls, message: Message) -> StepOutput:
        body = _body(message, KIND_OUTPUT, ["receipt"], tensors=1, optional=("note",))
        return cls(Receipt.from_bytes(body["receipt"]), message.tensors[0], body.get("note", ""))


@dataclass(frozen=True)
class CheckMessage:
    """Client -> verifier V, on V's *check session* for node N's session: compute the next step
    of V's session and compare it with what N claimed for the same steps.

    V's check session mirrors N's session from position 0 (same inputs, so V's positions are N's
    positions). ``step`` is V's own step: its request, signed by the client that signed N's, and
    N's inputs of the covered steps concatenated along the tokens, [batch, tokens, hidden]. The
    covered steps are N's steps from where V's session stands (0 the first time) on:
    ``node_requests`` and ``node_receipts`` (signed by the client and by N), ``claimed`` (N's
    outputs of those steps concatenated like the inputs), ``previous_chain`` (N's chain digest
    before the first covered step, ``GENESIS_CHAIN`` at step 0), ``beacon_epoch`` (the epoch of
    the beacon that assigned V) and ``profile`` (N's announced compute profile, which must be
    V's own). V answers with a :class:`CheckOutput`.
    """

    step: StepMessage
    node_requests: tuple[StepRequest, ...]
    node_receipts: tuple[Receipt, ...]
    claimed: torch.Tensor
    previous_chain: bytes
    beacon_epoch: int
    profile: str

    def __post_init__(self) -> None:
        if not isinstance(self.step, StepMessage):
            raise InvalidInput("a check's step is the verifier's own StepMessage")
        count = len(self.node_requests)
        if not 1 <= count <= MAX_CHECK_STEPS:
            raise InvalidInput(f"a check covers 1..{MAX_CHECK_STEPS} of the node's steps")
        if len(self.node_receipts) != count:
            raise InvalidInput(
                f"a check holds one receipt per covered step: {count} requests, "
                f"{len(self.node_receipts)} receipts"
            )
        if not all(isinstance(r, StepRequest) for r in self.node_requests) or not all(
            isinstance(r, Receipt) for r in self.node_receipts
        ):
            raise InvalidInput("a check's node_requests and node_receipts are signed records")
        if not isinstance(self.claimed, torch.Tensor):
            raise InvalidInput("a check's claimed outputs are a tensor")
        _check_bytes("previous_chain", self.previous_chain, DIGEST_SIZE)
        _check_int("beacon_epoch", self.beacon_epoch, 0, INT_MAX)
        _check_str("profile", self.profile, 16)

    @property
    def request(self) -> StepRequest:
        """V's own request."""
        return self.step.request

    @property
    def hidden(self) -> torch.Tensor:
        """N's inputs of the covered steps: V's input."""
        return self.step.hidden

    def to_message(self) -> Message:
        body: dict[str, Value] = {
            "request": self.request.to_bytes(),
            "node_requests": [r.to_bytes() for r in self.node_requests],
            "node_receipts": [r.to_bytes() for r in self.node_receipts],
            "previous_chain": self.previous_chain,
            "beacon_epoch": self.beacon_epoch,
            "profile": self.profile,
        }
        return Message(KIND_CHECK, body, (self.hidden, self.claimed))

    @classmethod
    def from_message(cls, message: Message) -> CheckMessage:
        names = (
            "request",
            "node_requests",
            "node_receipts",
            "previous_chain",
            "beacon_epoch",
            "profile",
        )
        body = _body(message, KIND_CHECK, names, tensors=2)
        requests = _records(body["node_requests"], "node_requests")
        receipts = _records(body["node_receipts"], "node_receipts")
        if len(requests) != len(receipts):
            raise InvalidInput("a check holds one receipt per covered step")
        request = body["request"]
        if not isinstance(request, bytes):
            raise InvalidInput("a check's request is bytes")
        return cls(
            StepMessage(StepRequest.from_bytes(request), message.tensors[0]),
            tuple(StepRequest.from_bytes(item) for item in requests),
            tuple(Receipt.from_bytes(item) for item in receipts),
            message.tensors[1],
            body["previous_chain"],
            body["beacon_epoch"],
            body["profile"],
        )


@dataclass(frozen=True)
class CheckOutput:
    """Verifier -> client, the answer to a :class:`CheckMessage`: V's step output and receipt
    (its recomputation of the covered steps) and V's signed verdict on N's claims."""

    receipt: Receipt
    hidden: torch.Tensor
    verdict: CheckVerdict
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, CheckVerdict):
            raise InvalidInput("a check's verdict is a CheckVerdict")
        _check_note(self.note)

    def to_message(self) -> Message:
        body: dict[str, Value] = {
            "receipt": self.receipt.to_bytes(),
            "verdict": self.verdict.to_value(),
        }
        if self.note:
            body["note"] = self.note
        return Message(KIND_CHECKED, body, (self.hidden,))

    @classmethod
    def from_message(cls, message: Message) -> CheckOutput:
        body = _body(message, KIND_CHECKED, ["receipt", "verdict"], tensors=1, optional=("note",))
        receipt = body["receipt"]
        if not isinstance(receipt, bytes):
            raise InvalidInput("a check output's receipt is bytes")
        return cls(
            Receipt.from_bytes(receipt),
            message.tensors[0],
            CheckVerdict.from_value(body["verdict"]),
            body.get("note", ""),
        )


@dataclass(frozen=True)
class ErrorReply:
    """Node -> client: a refusal.

    If ``fatal`` is false the session (if any) is left as it was before the refused message and
    the stream stays open; if true the node frees the session and ends the stream.
    """

    code: str
    message: str
    step: int | None = None
    fatal: bool = False

    def __post_init__(self) -> None:
        if self.code not in ErrorCode.ALL:
            raise InvalidInput(f"unknown error code {str(self.code)[:40]!r}")
        if not isinstance(self.message, str):
            raise InvalidInput("error message must be a string")
        object.__setattr__(self, "message", self.message[:_MAX_ERROR_TEXT])
        if self.step is not None:
            _check_int("step", self.step, 0)
        if not isinstance(self.fatal, bool):
            raise InvalidInput("fatal must be a bool")

    def to_message(self) -> Message:
        return Message(KIND_ERROR, _fields_of(self))

    @classmethod
    def from_message(cls, message: Message) -> ErrorReply:
        return cls(**_body(message, KIND_ERROR, cls.__dataclass_fields__, tensors=0))

    @classmethod
    def from_error(
        cls, error: Exception, step: int | None = None, fatal: bool = False
    ) -> ErrorReply:
        """The reply for an error raised while serving a request."""
        if isinstance(error, NodeBusy):
            return cls(ErrorCode.BUSY, str(error), step, fatal)
        if isinstance(error, VerificationError):
            return cls(ErrorCode.UNVERIFIABLE, str(error), step, fatal)
        if isinstance(error, CorollaError):
            return cls(ErrorCode.INVALID, str(error), step, fatal)
        return cls(ErrorCode.INTERNAL, f"internal error: {type(error).__name__}", step, fatal)

    def to_exception(self, peer_id: str | None = None) -> NodeError:
        """:class:`NodeBusy` for ``busy``, otherwise :class:`RemoteError`."""
        where = f"node {peer_id}" if peer_id else "node"
        text = f"{where} refused ({self.code}): {self.message}"
        if self.code == ErrorCode.BUSY:
            return NodeBusy(text, peer_id)
        return RemoteError(text, peer_id)


@dataclass(frozen=True)
class NodeInfo:
    """Node -> client, answer to ``rpc_info``: what the node serves and how much room it has.

    Not signed: the DHT record (:mod:`corolla.node.protocol.records`) is the signed announcement;
    every activation is covered by a receipt signed with ``public_key``.
    """

    peer_id: str
    public_key: bytes
    model_digest: bytes
    span_digest: bytes
    start: int
    end: int
    family: str
    hidden_size: int
    dtype: str
    quant: str
    max_length: int
    throughput: float
    """Tokens per second through the whole span, measured at startup."""
    cache_tokens_total: int
    cache_tokens_free: int
    sessions: int
    state: str
    version: str
    protocol: int = PROTOCOL_VERSION
    queued_high: int = 0
    """Ticketed computations waiting in the node's queue (0 from nodes that do not say)."""
    queued_free: int = 0
    """Free computations waiting in the node's queue."""
    forward_us: int = 0
    """Median wall time of the node's recent forward passes, in microseconds (0: none yet)."""
    overtaken: int = 0
    """Computations that ticketed ones have overtaken since the node started."""
    preempted: int = 0
    """Times a free computation was paused between two blocks for ticketed ones."""

    def __post_init__(self) -> None:
        _check_str("peer_id", self.peer_id)
        _check_bytes("public_key", self.public_key, PUBLIC_KEY_SIZE)
        _check_bytes("model_digest", self.model_digest, DIGEST_SIZE)
        _check_bytes("span_digest", self.span_digest, DIGEST_SIZE)
        _check_int("start", self.start, 0)
        _check_int("end", self.end, self.start + 1)
        for name in ("family", "dtype", "quant", "state", "version"):
            _check_str(name, getattr(self, name))
        for name in ("hidden_size", "max_length"):
            _check_int(name, getattr(self, name), 1)
        for name in (
            "cache_tokens_total",
            "cache_tokens_free",
            "sessions",
            "protocol",
            "queued_high",
            "queued_free",
            "forward_us",
            "overtaken",
            "preempted",
        ):
            _check_int(name, getattr(self, name), 0)
        if not isinstance(self.throughput, float | int) or not 0 <= self.throughput < 1e12:
            raise InvalidInput(f"throughput must be a non-negative number, not {self.throughput!r}")

    def to_message(self) -> Message:
        body = _fields_of(self)
        body["throughput"] = _milli(self.throughput)
        return Message(KIND_INFO, body)

    @classmethod
    def from_message(cls, message: Message) -> NodeInfo:
        names = set(cls.__dataclass_fields__) - _INFO_OPTIONAL
        fields = _body(message, KIND_INFO, names, tensors=0, optional=_INFO_OPTIONAL)
        _check_int("throughput", fields["throughput"], 0)
        fields["throughput"] = fields["throughput"] / 1000
        return cls(**fields)


_INFO_OPTIONAL = frozenset({"queued_high", "queued_free", "forward_us", "overtaken", "preempted"})


def _milli(value: float) -> int:
    """A non-negative float as an int count of thousandths (canonical encoding has no floats)."""
    return round(value * 1000)


# --------------------------------------------------------------------------- field checks


def _check_int(name: str, value: object, low: int, high: int = 2**62) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"{name} must be an int in [{low}, {high}], got {value!r}"[:300])


def _check_bytes(name: str, value: object, size: int | None, most: int | None = None) -> None:
    if not isinstance(value, bytes):
        raise InvalidInput(f"{name} must be bytes, not {type(value).__name__}")
    if size is not None and len(value) != size:
        raise InvalidInput(f"{name} must be {size} bytes, got {len(value)}")
    if most is not None and len(value) > most:
        raise InvalidInput(f"{name} is over {most} bytes")


def _records(value: object, name: str) -> list[bytes]:
    """A bounded list of encoded records (parsed by the caller)."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHECK_STEPS:
        raise InvalidInput(f"a check's {name} is a list of 1..{MAX_CHECK_STEPS} records")
    if not all(isinstance(item, bytes) for item in value):
        raise InvalidInput(f"a check's {name} holds encoded records (bytes)")
    return value


def _check_note(value: object) -> None:
    if not isinstance(value, str) or len(value) > _MAX_NOTE:
        raise InvalidInput(f"note must be a string of at most {_MAX_NOTE} characters")


def _check_str(name: str, value: object, most: int = _MAX_NAME) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= most:
        raise InvalidInput(f"{name} must be a string of 1..{most} characters")


def _fields_of(record: object) -> dict[str, Value]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}  # type: ignore[attr-defined]


def _body(
    message: Message,
    kind: str,
    names: Iterable[str],
    tensors: int,
    optional: Iterable[str] = (),
) -> dict[str, Value]:
    """The body of a ``kind`` message with ``tensors`` tensors, every field of ``names`` and
    nothing but those and the ``optional`` ones."""
    names = set(names)
    allowed = names | set(optional)
    if message.kind != kind:
        raise InvalidInput(f"expected a {kind!r} message, got {message.kind[:40]!r}")
    if len(message.tensors) != tensors:
        raise InvalidInput(
            f"a {kind!r} message carries {tensors} tensors, not {len(message.tensors)}"
        )
    if not names <= set(message.body) <= allowed:
        if allowed == names:
            raise InvalidInput(f"a {kind!r} message must hold exactly the fields {sorted(names)}")
        raise InvalidInput(
            f"a {kind!r} message must hold the fields {sorted(names)}, and may hold "
            f"{sorted(allowed - names)}"
        )
    return dict(message.body)
