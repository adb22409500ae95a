"""The ledger's settings: accounting rules (fixed for a log's life) and service limits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from corolla.errors import InvalidInput

__all__ = ["LedgerRules", "ServiceLimits"]


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

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise InvalidInput(f"ledger rule {field.name} must be a positive int, not {value}")

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
    max_evidence_bytes: int = 1024 * 1024
    """Largest canonical encoding of one fraud-evidence document."""
