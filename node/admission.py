"""Which priority a session's step runs at, and which ticket pays for it.

A session's ticket is judged once, at ``open``, by :meth:`TicketBook.admit
<corolla.node.ticket_book.TicketBook.admit>`. Each step of a session holding an honoured ticket
is then admitted by :func:`admit_step`: it runs at high priority when it names the session's
ticket and the ticket can pay its ``tokens x blocks`` block-tokens; otherwise it runs free, with a
note for the client. A ticket that cannot pay (budget used up, expired) is dropped from the
session for good; a step that does not name it only runs free itself. A ticket never fails a step.

The ticket book holds the counts; these functions keep no state of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from corolla.node.protocol.messages import PRIORITY_FREE, PRIORITY_HIGH
from corolla.node.scheduler import Priority
from corolla.node.ticket_book import HonouredTicket, TicketBook
from corolla.verify.receipts import StepRequest, work_units

__all__ = ["StepAdmission", "admit_step", "opened_priority"]


@dataclass(frozen=True)
class StepAdmission:
    """How one step runs: its queue class, the ticket charged for it, and a note if free."""

    priority: Priority
    charged: HonouredTicket | None = None
    """The ticket charged for the step: refund it if the step is not served."""
    note: str = ""
    """Why the step runs free although its session holds a ticket (empty otherwise)."""
    drops_ticket: bool = False
    """The ticket can no longer pay: the session runs free from now on."""


def admit_step(
    ticket: HonouredTicket | None, request: StepRequest, book: TicketBook
) -> StepAdmission:
    """Admit a step of a session holding ``ticket`` (None: free), charging ``book`` if high."""
    if ticket is None:
        return StepAdmission(Priority.FREE)
    if request.ticket_digest != ticket.digest:
        note = "the request does not name the session's ticket: this step ran at free priority"
        return StepAdmission(Priority.FREE, note=note)
    problem = book.charge(ticket, work_units(request))
    if problem is not None:
        note = f"{problem}: the session runs at free priority from now on"
        return StepAdmission(Priority.FREE, note=note, drops_ticket=True)
    return StepAdmission(Priority.HIGH, charged=ticket)


def opened_priority(ticket: HonouredTicket | None) -> str:
    """What the ``opened`` reply says of a session holding ``ticket``: high or free."""
    return PRIORITY_HIGH if ticket is not None else PRIORITY_FREE
