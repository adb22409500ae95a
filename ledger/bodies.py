"""Request bodies of the ledger's HTTP API as pydantic models: they document the API in its
OpenAPI schema and turn malformed input into 422 answers before any work is done. The rules
re-check everything (the log stores the canonical body, not these models)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from corolla.ledger.config import ServiceLimits
from corolla.verify.encoding import INT_MAX
from corolla.verify.receipts import MAX_BLOCK, MAX_TOKENS

__all__ = [
    "AttestationModel",
    "BeaconModel",
    "BuyTicketBody",
    "CalibrationModel",
    "CalibrationsBody",
    "DisputeBody",
    "EvidenceBody",
    "PairModel",
    "PairsBody",
    "ReceiptModel",
    "RegisterBody",
    "ReportBody",
    "ReportPairModel",
    "ServingBody",
    "SlashBody",
    "StepRequestModel",
    "VerdictModel",
]

Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Hex16 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=4096)]
Block = Annotated[int, Field(ge=0, le=MAX_BLOCK)]
Count = Annotated[int, Field(ge=0, le=INT_MAX)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Version = Annotated[int, Field(ge=1, le=INT_MAX)]
Profile = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,16}$")]
Number = Annotated[
    str, StringConstraints(pattern=r"^(inf|nan|[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?)$", max_length=32)
]

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


class ReportPairModel(BaseModel):
    """One step: ``StepRequest.to_bytes()`` and ``Receipt.to_bytes()``, base64."""

    model_config = _STRICT
    request: Base64
    receipt: Base64


class VerdictModel(BaseModel):
    """A verifier's signed verdict (``CheckVerdict.to_dict()``): it compared the node's steps
    ``[first_step, end_step)`` with its own recomputation and signed the score, the threshold
    and whether they passed."""

    model_config = _STRICT
    verifier_key: Hex32
    client_key: Hex32
    node_key: Hex32
    model_digest: Hex32
    span_digest: Hex32
    node_chain: Hex32
    recomputation_digest: Hex32
    session_id: Hex16
    start: Block
    end: Block
    first_step: Count
    end_step: Count
    first_position: Count
    end_position: Count
    beacon_epoch: Count
    recomputed_positions: Count
    profile: Profile
    score: Number
    threshold: Number
    passed: bool
    signature: Hex64


class BeaconModel(BaseModel):
    """The ledger's signed beacon of an epoch (``Beacon.to_dict()``)."""

    model_config = _STRICT
    origin: str = Field(min_length=1, max_length=256)
    period: int = Field(ge=1, le=24 * 3600)
    epoch: Count
    ledger_key: Hex32
    signature: Hex64


class AttestationModel(BaseModel):
    """A check (checks v2): the verifier's signed verdict, the client's request to the verifier
    and the verifier's receipt for its recomputation (``to_bytes()`` in base64), and the beacon
    of the epoch that assigned the verifier."""

    model_config = _STRICT
    verdict: VerdictModel
    request: Base64
    receipt: Base64
    beacon: BeaconModel


class ReportBody(BaseModel):
    """A client's report of its sessions: the nodes' pairs and its spot-check attestations."""

    model_config = _STRICT
    pairs: list[ReportPairModel] = Field(min_length=1, max_length=ServiceLimits().max_pairs)
    attestations: list[AttestationModel] = Field(max_length=ServiceLimits().max_attestations)


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
    """Fraud evidence: the base64 of ``FraudEvidence.to_bytes()`` (claims, recomputations)."""

    model_config = _STRICT
    evidence: str


class SlashBody(BaseModel):
    """Operator only: take an account's balance, zero its reputation, bar it from earning, on
    the strength of fraud evidence in the log (its digest)."""

    model_config = _STRICT
    account: Hex32
    reason: str = Field(max_length=500)
    evidence: Hex32


class ServingBody(BaseModel):
    """A node serves (or no longer serves) blocks ``[start, end)`` of the model with digest
    ``model`` under compute ``profile`` (fp32, int8, nf4)."""

    model_config = _STRICT
    model: Hex32
    start: Block
    end: Block
    profile: Profile


class CalibrationModel(BaseModel):
    """One model's measured honest divergence under one profile (a ``Calibration``, its
    numbers as text: ``repr`` of the float)."""

    model_config = _STRICT
    model_digest: Hex32
    profile: Profile
    checked_steps: int = Field(ge=1, le=INT_MAX)
    honest_max: Number
    honest_p999: Number
    threshold_margin: Number
    floor_margin: Number
    command: str = Field(max_length=1000)


class CalibrationsBody(BaseModel):
    """Operator only: publish calibrations (what ``corolla-tolerance.json`` holds)."""

    model_config = _STRICT
    calibrations: list[CalibrationModel] = Field(min_length=1, max_length=64)


class DisputeBody(BaseModel):
    """A dispute: the base64 of ``Dispute.to_bytes()`` (the node's claims and the verdicts on
    them), submitted by the client of the claims."""

    model_config = _STRICT
    dispute: str
