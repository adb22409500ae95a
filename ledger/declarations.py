"""What the assignment of checks reads from the log: serving declarations and calibrations.

- ``POST /v1/serving`` (action ``serving``, signed by the node): the node serves blocks
  ``[start, end)`` of a model under a compute profile; a ``serving_declared`` entry (payload:
  model digest, blocks, profile, time). The same declaration again while it is in force is
  refused (409). ``POST /v1/serving/withdraw`` (action ``serving-withdraw``): a
  ``serving_withdrawn`` entry retracts a declaration in force (409 if there is none).
- ``POST /v1/calibrations`` (action ``calibrate``, signed by the ledger's own key: the
  operator): one ``calibration_published`` entry per calibration (reference: the model digest;
  payload: the calibration with its floats as text, and the time). A verdict on a model is held
  to the threshold of the latest calibration of its profile published before its beacon's
  epoch began (:mod:`corolla.ledger.checks`).

Both are derived state the auditor rebuilds (``serving`` and ``calibrations`` tables, or the
auditor's memory), and the entry's time is in its payload, so replaying the log alone gives the
same answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corolla.errors import InvalidInput, LedgerRefused
from corolla.ledger.api.checks import Serving, calibration_from_wire, calibration_to_wire
from corolla.ledger.api.models import Draft
from corolla.ledger.state import LedgerState, ensure_account
from corolla.verify.identity import peer_name_of

if TYPE_CHECKING:
    from corolla.verify.tolerance import Calibration

__all__ = [
    "MAX_CALIBRATIONS",
    "apply_calibrations",
    "apply_serving",
    "parse_calibrations",
    "parse_serving",
]

MAX_CALIBRATIONS = 64
"""Most calibrations in one publication."""


def parse_serving(body: Any) -> Serving:
    """A declaration's (or withdrawal's) body; raises :class:`InvalidInput`."""
    return Serving.from_body(body)


def parse_calibrations(body: Any) -> list[Calibration]:
    """``{"calibrations": [wire form, ...]}``: 1..:data:`MAX_CALIBRATIONS` calibrations, each
    (model, profile) once; raises :class:`InvalidInput`."""
    if not isinstance(body, dict) or set(body) != {"calibrations"}:
        raise InvalidInput('a publication is an object with exactly one field, "calibrations"')
    items = body["calibrations"]
    if not isinstance(items, list) or not 0 < len(items) <= MAX_CALIBRATIONS:
        raise InvalidInput(f'"calibrations" must be a list of 1 to {MAX_CALIBRATIONS}')
    found: dict[tuple[bytes, str], Calibration] = {}
    for index, item in enumerate(items):
        try:
            calibration = calibration_from_wire(item)
        except InvalidInput as error:
            raise InvalidInput(f"calibration {index}: {error}") from None
        key = (calibration.model_digest, calibration.profile)
        if key in found:
            raise InvalidInput(f"calibration {index}: its model and profile come twice")
        found[key] = calibration
    return list(found.values())


def apply_serving(
    author: bytes,
    serving: Serving,
    withdraw: bool,
    state: LedgerState,
    time: int,
    seqs: list[int],
) -> None:
    """Log ``author``'s declaration of ``serving`` (or its withdrawal) at ``time`` (ms)."""
    what = (
        f"blocks [{serving.start}, {serving.end}) of model {serving.model_digest.hex()[:16]} "
        f"under {serving.profile}"
    )
    node = peer_name_of(author)
    declared = state.serves(author, serving)
    if withdraw and not declared:
        raise LedgerRefused(f"node {node} has no declaration in force of serving {what}", 409)
    if not withdraw and declared:
        raise LedgerRefused(f"node {node} already declares serving {what}", 409)
    payload = {
        "model": serving.model_digest,
        "start": serving.start,
        "end": serving.end,
        "profile": serving.profile,
        "time": time,
    }
    seqs.extend(ensure_account(state, author))
    kind = "serving_withdrawn" if withdraw else "serving_declared"
    seqs.append(state.append(Draft(kind, author, 0, b"", payload)))


def apply_calibrations(
    author: bytes,
    calibrations: list[Calibration],
    state: LedgerState,
    time: int,
    seqs: list[int],
) -> None:
    """Log the operator's publication of ``calibrations`` at ``time`` (ms)."""
    if author != state.ledger_key:
        raise LedgerRefused(
            "only the ledger operator (the ledger's own key) publishes tolerances", 403
        )
    for calibration in calibrations:
        payload = {"calibration": calibration_to_wire(calibration), "time": time}
        draft = Draft("calibration_published", author, 0, calibration.model_digest, payload)
        seqs.append(state.append(draft))
