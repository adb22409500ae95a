"""Signed per-step records: the client's :class:`StepRequest` and the node's :class:`Receipt`.

One inference step on one node yields a pair. The client signs a request naming the model, the
span ``[start, end)`` of blocks, the session, the step and the digest of the hidden states it
sends. The node answers with a receipt that repeats those fields, adds the digest of its output
and the session's chain digest, binds itself to the exact signed request (``request_digest``),
and signs it all. A receipt is therefore a self-contained, transferable statement "node N
computed output O from input I at this point of this session for client C", which anyone holding
the request can re-check, and the ledger pays for in block-tokens (:func:`work_units`).

Every record validates its fields when built (:class:`~corolla.errors.InvalidInput`), so a
``StepRequest`` or ``Receipt`` in hand is always well-formed; whether it is *true* is what
:func:`verify_request` and :func:`verify_receipt` decide. Records travel as JSON-safe dicts
(bytes as lowercase hex, :meth:`to_dict`) or as canonical bytes (:meth:`to_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from corolla.errors import BadReceipt, BadSignature, InvalidInput
from corolla.verify.digests import DIGEST_SIZE, chain_digest, tensor_digest
from corolla.verify.encoding import (
    DOMAIN_PREFIX,
    INT_MAX,
    decode,
    domain_digest,
    domain_message,
    from_lower_hex,
)
from corolla.verify.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    peer_name_of,
    verify_signature,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_BLOCK",
    "MAX_TOKENS",
    "SESSION_ID_SIZE",
    "Receipt",
    "StepRequest",
    "make_receipt",
    "read_receipts_jsonl",
    "sign_request",
    "verify_receipt",
    "verify_request",
    "work_units",
    "write_receipts_jsonl",
]

SESSION_ID_SIZE = 16
MAX_BLOCK = 2**20
"""Largest block index a span may name; keeps work units well inside 64 bits."""
MAX_TOKENS = 2**40
"""Most tokens one step may claim."""

_UNSIGNED = bytes(SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True)
class _Int:
    low: int
    high: int = INT_MAX


@dataclass(frozen=True, slots=True)
class _Bytes:
    size: int
    optional: bool = False


_Spec = _Int | _Bytes

_VERSION = _Int(1)
_COUNT = _Int(0)
_BLOCK = _Int(0, MAX_BLOCK)
_TOKENS = _Int(1, MAX_TOKENS)
_DIGEST = _Bytes(DIGEST_SIZE)
_KEY = _Bytes(PUBLIC_KEY_SIZE)
_SESSION = _Bytes(SESSION_ID_SIZE)
_SIGNATURE = _Bytes(SIGNATURE_SIZE)


def _spec(spec: _Spec) -> Any:
    """A dataclass field (no default) carrying how its values are validated and serialised."""
    return dataclasses.field(metadata={"spec": spec})


@functools.cache
def _schema(cls: type) -> dict[str, _Spec]:
    return {field.name: field.metadata["spec"] for field in dataclasses.fields(cls)}


class _SignedRecord:
    """Validation, signing bytes and (de)serialisation shared by the two record types.

    Records are immutable, so their encodings are computed once and kept (a step's request is
    encoded for signing, for the wire and for its digest, on both sides of the wire).
    """

    _DOMAIN: ClassVar[str]
    start: int
    end: int
    signature: bytes

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field, spec in _schema(type(self)).items():
            _check(name, field, spec, getattr(self, field))
        if self.start >= self.end:
            raise InvalidInput(f"{name}: span [{self.start}, {self.end}) holds no blocks")

    def _fields(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in _schema(type(self))}

    def _remember(self, name: str, value: bytes) -> bytes:
        object.__setattr__(self, name, value)  # a cache beside the fields, not a field
        return value

    def signing_bytes(self) -> bytes:
        """Canonical, domain-separated bytes of every field but the signature: what is signed."""
        cached = self.__dict__.get("_signing_bytes")
        if cached is not None:
            return cached
        fields = self._fields()
        del fields["signature"]
        return self._remember("_signing_bytes", domain_message(self._DOMAIN, fields))

    def digest(self) -> bytes:
        """32-byte digest of the signed record (signing bytes and signature): its identity."""
        cached = self.__dict__.get("_digest")
        if cached is not None:
            return cached
        digest = domain_digest("signed-" + self._DOMAIN, self.signing_bytes(), self.signature)
        return self._remember("_digest", digest)

    def _sign(self, identity: Identity) -> Self:
        """This unsigned record, signed by ``identity``; only for records no one else holds yet
        (the signature is set in place, which keeps the checked fields and the signing bytes)."""
        object.__setattr__(self, "signature", identity.sign(self.signing_bytes()))
        for name in ("_bytes", "_digest"):  # both cover the signature
            self.__dict__.pop(name, None)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: ints stay ints, bytes become lowercase hex, None stays None."""
        return {
            field: value.hex() if isinstance(value, bytes) else value
            for field, value in self._fields().items()
        }

    @classmethod
    def from_dict(cls, data: object) -> Self:
        """Parse :meth:`to_dict` output strictly (exact keys, exact types, lowercase hex)."""
        return cls._from_mapping(data, hex_bytes=True)

    def to_bytes(self) -> bytes:
        """Canonical binary form (see :mod:`corolla.verify.encoding`) for the wire."""
        cached = self.__dict__.get("_bytes")
        if cached is not None:
            return cached
        return self._remember("_bytes", domain_message(self._DOMAIN, self._fields()))

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse :meth:`to_bytes` output strictly; raises only :class:`InvalidInput`."""
        value = decode(data, max_items=4 * len(_schema(cls)))
        if (
            not isinstance(value, list)
            or len(value) != 2
            or value[0] != DOMAIN_PREFIX + cls._DOMAIN
            or not isinstance(value[1], list)
            or len(value[1]) != 1
        ):
            raise InvalidInput(f"bytes are not an encoded {cls.__name__}")
        record = cls._from_mapping(value[1][0], hex_bytes=False)
        # decode() accepts canonical bytes only, so these are exactly what to_bytes() would give
        record._remember("_bytes", bytes(data))
        return record

    @classmethod
    def _from_mapping(cls, data: object, *, hex_bytes: bool) -> Self:
        name = cls.__name__
        if not isinstance(data, Mapping):
            raise InvalidInput(f"{name} must be an object, not {type(data).__name__}")
        schema = _schema(cls)
        missing = sorted(set(schema) - set(data))
        unknown = sorted(str(key) for key in set(data) - set(schema))
        if missing or unknown:
            raise InvalidInput(f"{name}: missing fields {missing}, unknown fields {unknown}")
        values: dict[str, Any] = {}
        for field, spec in schema.items():
            value = data[field]
            if hex_bytes and isinstance(spec, _Bytes) and value is not None:
                value = from_lower_hex(value, f"{name}.{field}")
            values[field] = value
        return cls(**values)


@dataclass(frozen=True)
class StepRequest(_SignedRecord):
    """One step a client asks of one node, signed by the client (``client_key``)."""

    protocol_version: int = _spec(_VERSION)
    model_digest: bytes = _spec(_DIGEST)
    span_digest: bytes = _spec(_DIGEST)
    start: int = _spec(_BLOCK)
    end: int = _spec(_BLOCK)
    session_id: bytes = _spec(_SESSION)
    step: int = _spec(_COUNT)
    position: int = _spec(_COUNT)
    tokens: int = _spec(_TOKENS)
    input_digest: bytes = _spec(_DIGEST)
    client_key: bytes = _spec(_KEY)
    ticket_digest: bytes | None = _spec(_Bytes(DIGEST_SIZE, optional=True))
    signature: bytes = _spec(_SIGNATURE)

    _DOMAIN: ClassVar[str] = "step-request"


@dataclass(frozen=True)
class Receipt(_SignedRecord):
    """A node's signed statement of the output it computed for one :class:`StepRequest`."""

    protocol_version: int = _spec(_VERSION)
    model_digest: bytes = _spec(_DIGEST)
    span_digest: bytes = _spec(_DIGEST)
    start: int = _spec(_BLOCK)
    end: int = _spec(_BLOCK)
    session_id: bytes = _spec(_SESSION)
    step: int = _spec(_COUNT)
    position: int = _spec(_COUNT)
    tokens: int = _spec(_TOKENS)
    client_key: bytes = _spec(_KEY)
    node_key: bytes = _spec(_KEY)
    request_digest: bytes = _spec(_DIGEST)
    input_digest: bytes = _spec(_DIGEST)
    output_digest: bytes = _spec(_DIGEST)
    chain_digest: bytes = _spec(_DIGEST)
    signature: bytes = _spec(_SIGNATURE)

    _DOMAIN: ClassVar[str] = "receipt"


# The fields a receipt must copy from its request unchanged.
_ECHOED_FIELDS = tuple(
    field for field in _schema(StepRequest) if field in _schema(Receipt) and field != "signature"
)


def sign_request(
    identity: Identity,
    *,
    protocol_version: int,
    model_digest: bytes,
    span_digest: bytes,
    start: int,
    end: int,
    session_id: bytes,
    step: int,
    position: int,
    tokens: int,
    input_digest: bytes,
    ticket_digest: bytes | None = None,
) -> StepRequest:
    """Build and sign a request as ``identity`` (which becomes its ``client_key``)."""
    unsigned = StepRequest(
        protocol_version=protocol_version,
        model_digest=model_digest,
        span_digest=span_digest,
        start=start,
        end=end,
        session_id=session_id,
        step=step,
        position=position,
        tokens=tokens,
        input_digest=input_digest,
        client_key=identity.public_key,
        ticket_digest=ticket_digest,
        signature=_UNSIGNED,
    )
    return unsigned._sign(identity)


def verify_request(request: StepRequest) -> None:
    """Check the client's signature on ``request``; raise :class:`BadSignature` if it fails."""
    verify_signature(request.client_key, request.signing_bytes(), request.signature)


def make_receipt(
    identity: Identity, request: StepRequest, output_digest: bytes, previous_chain: bytes
) -> Receipt:
    """Sign, as node ``identity``, the receipt for ``request`` having produced ``output_digest``.

    ``previous_chain`` is the chain digest of the session's previous step on this node
    (:data:`~corolla.verify.digests.GENESIS_CHAIN` for step 0). The caller verifies the request
    (:func:`verify_request`) before computing anything.
    """
    unsigned = Receipt(
        protocol_version=request.protocol_version,
        model_digest=request.model_digest,
        span_digest=request.span_digest,
        start=request.start,
        end=request.end,
        session_id=request.session_id,
        step=request.step,
        position=request.position,
        tokens=request.tokens,
        client_key=request.client_key,
        node_key=identity.public_key,
        request_digest=request.digest(),
        input_digest=request.input_digest,
        output_digest=output_digest,
        chain_digest=chain_digest(
            previous_chain, request.step, request.input_digest, output_digest
        ),
        signature=_UNSIGNED,
    )
    return unsigned._sign(identity)


def verify_receipt(
    receipt: Receipt,
    *,
    request: StepRequest,
    output: torch.Tensor | None = None,
    output_digest: bytes | None = None,
    previous_chain: bytes | None,
    node_key: bytes | None = None,
) -> None:
    """Check that ``receipt`` is the expected node's true statement about ``request``.

    Raises :class:`BadSignature` if the receipt is not signed by ``node_key`` (when given) or by
    the key it names; then :class:`BadReceipt` if the authentic receipt disagrees with the
    request, with the tensor actually received (``output``) or its digest (``output_digest``),
    or with ``previous_chain`` (``None``: the session's earlier steps are not at hand, so the
    chain is not checked; the receipt still binds its request and output). An authentic but
    inconsistent receipt is evidence against its node. At least one of ``output`` and
    ``output_digest`` must be given. The request's own signature is checked by
    :func:`verify_request`.
    """
    if output is None and output_digest is None:
        raise InvalidInput("verify_receipt needs the output tensor or its digest")
    if node_key is not None and receipt.node_key != node_key:
        raise BadSignature(
            f"receipt is signed by node {peer_name_of(receipt.node_key)}, "
            f"expected {peer_name_of(node_key)}"
        )
    verify_signature(receipt.node_key, receipt.signing_bytes(), receipt.signature)
    node = peer_name_of(receipt.node_key)
    for field in _ECHOED_FIELDS:
        if getattr(receipt, field) != getattr(request, field):
            raise BadReceipt(f"receipt from node {node}: {field} differs from the request")
    if receipt.request_digest != request.digest():
        raise BadReceipt(f"receipt from node {node} is bound to another request")
    if output is not None and tensor_digest(output) != receipt.output_digest:
        raise BadReceipt(f"receipt from node {node} names another output than the one received")
    if output_digest is not None and output_digest != receipt.output_digest:
        raise BadReceipt(f"receipt from node {node} names another output digest")
    if previous_chain is None:
        return
    expected_chain = chain_digest(
        previous_chain, receipt.step, receipt.input_digest, receipt.output_digest
    )
    if receipt.chain_digest != expected_chain:
        raise BadReceipt(f"receipt from node {node} does not extend the session's chain")


def work_units(record: StepRequest | Receipt) -> int:
    """The work a step asks for (request) or proves (receipt), in block-tokens:
    ``tokens * (end - start)``; also what the step costs a ticket."""
    return record.tokens * (record.end - record.start)


def write_receipts_jsonl(path: str | os.PathLike[str], receipts: Iterable[Receipt]) -> None:
    """Write receipts as JSON lines, atomically replacing ``path``."""
    path = Path(path)
    lines = [json.dumps(r.to_dict(), sort_keys=True, separators=(",", ":")) for r in receipts]
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise InvalidInput(f"cannot write receipts to {path}: {error.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def read_receipts_jsonl(path: str | os.PathLike[str]) -> list[Receipt]:
    """Read receipts written by :func:`write_receipts_jsonl`; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"cannot read receipts from {path}: {error}") from None
    receipts = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as error:
            raise InvalidInput(f"{path}:{number}: not a JSON object: {error}") from None
        try:
            receipts.append(Receipt.from_dict(data))
        except InvalidInput as error:
            raise InvalidInput(f"{path}:{number}: {error}") from None
    return receipts


def _check(name: str, field: str, spec: _Spec, value: object) -> None:
    if isinstance(spec, _Int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{name}.{field} must be an int, not {type(value).__name__}")
        if not spec.low <= value <= spec.high:
            raise InvalidInput(f"{name}.{field}={value} is outside [{spec.low}, {spec.high}]")
    elif value is None:
        if not spec.optional:
            raise InvalidInput(f"{name}.{field} is required")
    elif not isinstance(value, bytes) or len(value) != spec.size:
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise InvalidInput(f"{name}.{field} must be {spec.size} bytes, got {shown}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys in object")
    return result


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not allowed")
