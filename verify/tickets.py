"""Priority tickets: a client's prepaid budget of block-tokens, signed by the ledger.

A client buys a ticket with points; the ledger signs (domain ``ledger-ticket``) the client's key,
the budget in block-tokens, the price paid per block-token, the expiry and a serial (the digest
of the purchase operation). The client names the ticket's :meth:`Ticket.digest` in the
``ticket_digest`` of its signed step requests; nodes check the ticket (:func:`verify_ticket`)
to put those requests first, then redeem the receipts at the ledger to be paid from the ticket.
Pure functions: nodes and clients use this module without the ledger's database.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corolla.errors import BadSignature, InvalidInput
from corolla.verify.encoding import INT_MAX, domain_digest, domain_message
from corolla.verify.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    peer_name_of,
    verify_signature,
)

__all__ = ["Ticket", "issue_ticket", "verify_ticket"]

_BYTES = {"ledger_key": PUBLIC_KEY_SIZE, "client_key": PUBLIC_KEY_SIZE, "serial": 32}
_INTS = ("budget", "price", "expiry")
_FIELDS = ("ledger_key", "client_key", "budget", "price", "expiry", "serial", "signature")


@dataclass(frozen=True, slots=True)
class Ticket:
    """A ledger-signed budget of ``budget`` block-tokens for ``client_key`` until ``expiry``."""

    ledger_key: bytes
    client_key: bytes
    budget: int
    price: int
    expiry: int
    serial: bytes
    signature: bytes

    def __post_init__(self) -> None:
        for name, size in (*_BYTES.items(), ("signature", SIGNATURE_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise InvalidInput(f"ticket {name} must be {size} bytes")
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT_MAX:
                raise InvalidInput(f"ticket {name} must be a positive 64-bit int")

    def signing_bytes(self) -> bytes:
        """What the ledger signs: every field but the signature."""
        return domain_message(
            "ledger-ticket",
            self.ledger_key,
            self.client_key,
            self.budget,
            self.price,
            self.expiry,
            self.serial,
        )

    def digest(self) -> bytes:
        """The ticket's identity, named by ``StepRequest.ticket_digest``."""
        return domain_digest("signed-ledger-ticket", self.signing_bytes(), self.signature)

    def to_value(self) -> dict[str, Any]:
        """Canonical-encodable dict (bytes stay bytes): how the log stores it."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_value(cls, value: Any) -> Ticket:
        """Parse :meth:`to_value` output; raises :class:`InvalidInput`."""
        if not isinstance(value, Mapping) or set(value) != set(_FIELDS):
            raise InvalidInput(f"a ticket has exactly the fields {_FIELDS}")
        return cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: bytes as lowercase hex."""
        return {
            name: value.hex() if isinstance(value, bytes) else value
            for name, value in self.to_value().items()
        }

    @classmethod
    def from_dict(cls, data: Any) -> Ticket:
        """Parse :meth:`to_dict` output; raises :class:`InvalidInput`."""
        if not isinstance(data, Mapping) or set(data) != set(_FIELDS):
            raise InvalidInput(f"a ticket has exactly the fields {_FIELDS}")
        values = dict(data)
        for name in (*_BYTES, "signature"):
            text = values[name]
            try:
                if not isinstance(text, str) or text != text.lower():
                    raise ValueError
                values[name] = bytes.fromhex(text)
            except ValueError:
                raise InvalidInput(f"ticket {name} must be lowercase hex") from None
        return cls(**values)


def issue_ticket(
    ledger: Identity, client_key: bytes, budget: int, price: int, expiry: int, serial: bytes
) -> Ticket:
    """Sign a ticket as the ledger."""
    unsigned = Ticket(
        ledger_key=ledger.public_key,
        client_key=client_key,
        budget=budget,
        price=price,
        expiry=expiry,
        serial=serial,
        signature=bytes(SIGNATURE_SIZE),
    )
    return dataclasses.replace(unsigned, signature=ledger.sign(unsigned.signing_bytes()))


def verify_ticket(
    ticket: Ticket, *, ledger_key: bytes | None = None, now_ms: int | None = None
) -> None:
    """Check the ledger's signature (pinned to ``ledger_key`` when given) and, when ``now_ms``
    is given, that the ticket has not expired. Raises :class:`BadSignature` or
    :class:`InvalidInput` (expired)."""
    if ledger_key is not None and ticket.ledger_key != ledger_key:
        raise BadSignature(
            f"ticket is signed by {peer_name_of(ticket.ledger_key)}, "
            f"not by the ledger {peer_name_of(ledger_key)}"
        )
    verify_signature(ticket.ledger_key, ticket.signing_bytes(), ticket.signature)
    if now_ms is not None and now_ms > ticket.expiry:
        raise InvalidInput("ticket has expired")
