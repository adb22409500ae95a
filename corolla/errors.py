"""The one exception tree of Corolla.

Every error that crosses a boundary (network, file, command line) is one of these, so callers
catch what they mean and the command line turns any of them into a one-line message::

    CorollaError
    ├── InvalidInput              a request, argument or tensor that is malformed or out of range
    │   └── SpanOutOfRange        blocks outside the model
    ├── CheckpointError           a model directory that cannot be used
    │   ├── MissingTensor         a tensor the span needs is not in the checkpoint
    │   └── UnsupportedModel      a model type no family adapter handles
    ├── KeyFileError              an identity file that is missing, unreadable or corrupt
    ├── VerificationError         a signature, digest or receipt that does not check out
    │   ├── BadSignature
    │   ├── BadReceipt
    │   └── UnverifiedText        checks were required and some tokens went unchecked
    ├── NodeError                 a remote node failed us
    │   ├── NodeUnavailable       unreachable, dead or timed out
    │   ├── NodeBusy              refused for lack of capacity (cache room, queue)
    │   └── RemoteError           the node answered with an error message
    ├── RouteUnavailable          no chain of live, allowed nodes covers the model
    ├── SessionError              an inference session used out of order or after close
    └── LedgerError               the ledger could not be reached or refused a request
        └── LedgerRefused         the ledger answered 4xx with a reason
"""

from typing import Any

__all__ = [
    "BadReceipt",
    "BadSignature",
    "CheckpointError",
    "CorollaError",
    "InvalidInput",
    "KeyFileError",
    "LedgerError",
    "LedgerRefused",
    "MissingTensor",
    "NodeBusy",
    "NodeError",
    "NodeUnavailable",
    "RemoteError",
    "RouteUnavailable",
    "SessionError",
    "SpanOutOfRange",
    "UnsupportedModel",
    "UnverifiedText",
    "VerificationError",
]


class CorollaError(Exception):
    """Base of every error Corolla raises on purpose."""


class InvalidInput(CorollaError):
    """A request, argument or tensor that is malformed or out of range."""


class SpanOutOfRange(InvalidInput):
    """A block span that does not fit inside the model."""


class CheckpointError(CorollaError):
    """A model directory that cannot be used."""


class MissingTensor(CheckpointError):
    """A tensor the span needs is not in the checkpoint."""


class UnsupportedModel(CheckpointError):
    """A model type that no family adapter handles."""


class KeyFileError(CorollaError):
    """An identity key file that is missing, unreadable or corrupt."""


class VerificationError(CorollaError):
    """A signature, digest or receipt that does not check out."""


class BadSignature(VerificationError):
    """A signature that does not verify under the claimed key."""


class BadReceipt(VerificationError):
    """A receipt that is inconsistent with the request or the returned tensor."""


class NodeError(CorollaError):
    """A remote node failed to serve a request."""

    def __init__(self, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class NodeUnavailable(NodeError):
    """The node is unreachable, dead or timed out."""


class NodeBusy(NodeError):
    """The node refused for lack of capacity (cache room or queue space)."""


class RemoteError(NodeError):
    """The node answered with an error message."""


class RouteUnavailable(CorollaError):
    """No chain of live, allowed nodes covers the requested blocks."""


class SessionError(CorollaError):
    """An inference session used out of order or after it was closed."""


class LedgerError(CorollaError):
    """The ledger could not be reached or answered unexpectedly."""


class LedgerRefused(LedgerError):
    """The ledger refused a request (HTTP 4xx) and said why."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class UnverifiedText(VerificationError):
    """Generation was asked to return only checked text (``require_checks``), and some tokens'
    steps went unchecked; ``ranges`` names them and why (each with ``describe()``)."""

    def __init__(self, ranges: tuple[Any, ...]) -> None:
        names = "; ".join(r.describe() for r in ranges)
        super().__init__(
            f"the text was not fully verified and checks were required: {names} (no text is "
            "returned; run without --require-checks to get it marked as unverified)"
        )
        self.ranges = ranges
