"""Request bodies of the ledger's HTTP API as pydantic models: they document the API in its
OpenAPI schema and turn malformed input into 422 answers before any work is done. The rules
re-check everything (the log stores the canonical body, not these models)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from corolla.ledger.config import ServiceLimits
from corolla.verify.encoding import INT_MAX
from corolla.verify.receipts import MAX_BLOCK, MAX_TOKENS

__all__ = [
    "BuyTicketBody",
    "EvidenceBody",
    "PairModel",
    "PairsBody",
    "ReceiptModel",
    "RegisterBody",
    "SlashBody",
    "StepRequestModel",
]

Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Hex16 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
Block = Annotated[int, Field(ge=0, le=MAX_BLOCK)]
Count = Annotated[int, Field(ge=0, le=INT_MAX)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Version = Annotated[int, Field(ge=1, le=INT_MAX)]

_STRICT = ConfigDict(extra="forbid", strict=True)


class StepRequestModel(BaseModel):
    """A client's signed step request (``StepRequest.to_dict()``)."""

    model_config = _STRICT
    protocol_version: Version
    model_digest: Hex32
    span_digest: Hex32
    start: Block
    end: Block
    session_id: Hex16
    step: Count
    position: Count
    tokens: Tokens
    input_digest: Hex32
    client_key: Hex32
    ticket_digest: Hex32 | None
    signature: Hex64


class ReceiptModel(BaseModel):
    """A node's signed receipt (``Receipt.to_dict()``)."""

    model_config = _STRICT
    protocol_version: Version
    model_digest: Hex32
    span_digest: Hex32
    start: Block
    end: Block
    session_id: Hex16
    step: Count
    position: Count
    tokens: Tokens
    client_key: Hex32
    node_key: Hex32
    request_digest: Hex32
    input_digest: Hex32
    output_digest: Hex32
    chain_digest: Hex32
    signature: Hex64


class PairModel(BaseModel):
    """One step: the client's request and the node's receipt for it."""

    model_config = _STRICT
    request: StepRequestModel
    receipt: ReceiptModel


class PairsBody(BaseModel):
    """Work to credit, or ticketed work to redeem."""

    model_config = _STRICT
    pairs: list[PairModel] = Field(min_length=1, max_length=ServiceLimits().max_pairs)


class RegisterBody(BaseModel):
    """Register the signing key as an account with a display name."""

    model_config = _STRICT
    name: str = Field(max_length=64)


class BuyTicketBody(BaseModel):
    """Buy a priority ticket of ``budget`` block-tokens valid for ``ttl_s`` seconds."""

    model_config = _STRICT
    budget: int = Field(ge=1, le=2**40)
    ttl_s: int = Field(ge=1, le=2**31)


class EvidenceBody(BaseModel):
    """Fraud evidence against a node (stored now, judged by the spot-check rules)."""

    model_config = _STRICT
    accused: Hex32
    evidence: JsonValue


class SlashBody(BaseModel):
    """Operator only: take an account's balance and zero its reputation."""

    model_config = _STRICT
    account: Hex32
    reason: str = Field(max_length=500)
    evidence: Hex32 | None
