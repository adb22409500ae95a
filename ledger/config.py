"""The ledger's settings: accounting rules (fixed for a log's life) and service limits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from corolla.errors import InvalidInput
from corolla.verify.beacon import MAX_PERIOD_S

__all__ = ["LedgerRules", "ServiceLimits"]

_MAY_BE_ZERO = frozenset({"verifier_fee_permille", "min_verifier_reputation"})


@dataclass(frozen=True, slots=True)
class LedgerRules:
    """Accounting rules. Written into the log's first (genesis) entry, so every auditor replays
    the log under the rules it was written with; a log's rules never change."""

    credit_per_block_token: int = 1
    """Points minted per block-token of verified work (``tokens * blocks``)."""
    ticket_price_per_block_token: int = 1
    """Points a client pays per block-token of ticket budget; nodes are paid the same rate."""
    ticket_max_ttl_s: int = 7 * 24 * 3600
    """Longest lifetime a ticket may be bought for."""
    redeem_grace_s: int = 3600
    """How long after a ticket's expiry its receipts may still be redeemed."""
    reputation_cap: int = 100
    """Reputation earned slowly (+1 per newly credited client session) stops here."""
    clock_window_s: int = 120
    """A signed request's timestamp must be within this many seconds of the ledger's clock."""
    verifier_fee_permille: int = 100
    """A verifier's fee for a counted spot-check, in thousandths of ``credit_per_block_token``
    per block-token it recomputed (100: 10 % of what the same work earns a node). 0: no fee."""
    min_verifier_reputation: int = 0
    """A verifier counts (its attestations credit work, its recomputations convict) only if it
    was never slashed and its reputation is at least this. 0 lets a new swarm bootstrap: nobody
    has reputation yet. Raising it makes every verifier first earn credit in that many client
    sessions checked by others, so a Sybil verifier costs real, checked work."""
    beacon_period_s: int = 10
    """Length of a beacon epoch (``GET /v1/beacon/{epoch}``): a check is assigned by the beacon
    of the first epoch that began after the client received the node's last checked receipt,
    among the verifiers declared before that epoch began."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            low = 0 if field.name in _MAY_BE_ZERO else 1
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**31:
                raise InvalidInput(
                    f"ledger rule {field.name} must be an int in [{low}, 2^31), not {value}"
                )
        if self.beacon_period_s > MAX_PERIOD_S:
            raise InvalidInput(f"ledger rule beacon_period_s must be at most {MAX_PERIOD_S}")

    def to_dict(self) -> dict[str, int]:
        """The rules as a canonical-encodable dict (the genesis entry's payload)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LedgerRules:
        """Parse :meth:`to_dict` output; raises :class:`InvalidInput`."""
        names = {field.name for field in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise InvalidInput(f"ledger rules must have exactly the fields {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """Limits of the HTTP service (not part of the log: an operator may change them)."""

    max_body_bytes: int = 4 * 1024 * 1024
    """Requests with a larger body are refused with 413 before they are read."""
    max_pairs: int = 2000
    """Most (request, receipt) pairs in one submission."""
    max_attestations: int = 512
    """Most spot-check attestations in one report."""
    max_evidence_body_bytes: int = 32 * 1024 * 1024
    """Largest body of ``POST /v1/evidence`` (fraud evidence with its tensors, base64 in JSON);
    every other endpoint keeps ``max_body_bytes``."""
