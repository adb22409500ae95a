"""What spot-checks need from the ledger, and the rules (threshold, honest floor) they apply.

:class:`CheckLedger` is the seam: the four calls a client's checks make (the ledger's HTTP
client, :class:`~corolla.ledger.api.client.AsyncLedgerClient`, is the real one; a test may give
an in-process ledger with a real referee). Without a ledger there is no beacon and no referee:
the client draws verifiers with its own randomness, such checks protect the user's text and
credit nothing, and a failed check cannot be judged.

:class:`CheckRules` gives the threshold a verdict must have applied and the honest floor of the
head rule, per compute profile, for the client's model: the ledger's published calibration
first, else the calibration file beside the checkpoint
(:data:`~corolla.verify.tolerance.CALIBRATION_FILE`, if it was measured on this model), else
the profile's default threshold with a floor of a tenth of it (:data:`DEFAULT_FLOOR_RATIO`, the
same rule the ledger's referee applies to an uncalibrated model).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from corolla.errors import InvalidInput
from corolla.ledger.api.models import Account
from corolla.verify.beacon import Beacon
from corolla.verify.disputes import Dispute
from corolla.verify.tolerance import (
    CALIBRATION_FILE,
    DEFAULT_FLOOR_RATIO,
    Calibration,
    load_calibrations,
    tolerance_for,
)

__all__ = ["DEFAULT_FLOOR_RATIO", "CheckLedger", "CheckRules", "read_calibrations"]

"""Without a calibration, the honest floor is the profile's default threshold divided by this
(the defaults sit at least 10x above every honest score measured on the tiny models)."""


class CheckLedger(Protocol):
    """The ledger calls of checks v2 (``docs/checks-protocol.md``)."""

    async def beacon(self, epoch: int | None = None) -> Beacon:
        """The beacon of ``epoch`` (the current one if None); ``LedgerRefused`` (425) for an
        epoch that has not begun."""
        ...

    async def servers(
        self, model_digest: bytes, start: int, end: int, profile: str, before_epoch: int
    ) -> list[bytes]:
        """Public keys of the nodes that declared, before ``before_epoch`` began, to serve
        blocks ``[start, end)`` of the model with ``profile``."""
        ...

    async def calibrations(self, model_digest: bytes) -> dict[str, Calibration]:
        """The model's published calibrations, by profile."""
        ...

    async def account(self, key: bytes) -> Account | None:
        """What the ledger knows of ``key`` (None: nothing): a slashed account, or one below
        the ledger's ``min_verifier_reputation``, is not a trusted verifier."""
        ...

    async def info(self) -> dict[str, Any]:
        """The ledger's origin, key and rules (``rules.min_verifier_reputation``)."""
        ...

    async def submit_dispute(self, dispute: Dispute) -> Any:
        """The ledger's judgment of ``dispute``: a
        :class:`~corolla.ledger.api.checks.DisputeOutcome` (``judged``, ``node_lied``,
        ``lying_verifiers``, ``judge``, ``reason``)."""
        ...


def read_calibrations(directory: Path, model_digest: bytes) -> dict[str, Calibration]:
    """The calibrations beside a checkpoint, by profile; none if there is no file or it was
    measured on another model. A damaged file raises :class:`InvalidInput`."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    found = load_calibrations(path)
    if any(c.model_digest != model_digest for c in found.values()):
        return {}
    return found


class CheckRules:
    """Threshold and honest floor per profile for one model (see the module doc)."""

    def __init__(self, model_digest: bytes, local: Mapping[str, Calibration] | None = None) -> None:
        self.model_digest = model_digest
        self._local = {
            profile: c for profile, c in (local or {}).items() if c.model_digest == model_digest
        }
        self._published: dict[str, Calibration] = {}

    def publish(self, calibrations: Mapping[str, Calibration]) -> None:
        """The ledger's calibrations (they take precedence over the local file)."""
        for profile, calibration in calibrations.items():
            if calibration.model_digest != self.model_digest or calibration.profile != profile:
                raise InvalidInput(f"the ledger's {profile} calibration is of another model")
        self._published = dict(calibrations)

    def calibration(self, profile: str) -> Calibration | None:
        return self._published.get(profile) or self._local.get(profile)

    def threshold(self, profile: str) -> float:
        calibration = self.calibration(profile)
        if calibration is not None:
            return calibration.threshold
        return tolerance_for(profile).threshold

    def honest_floor(self, profile: str) -> float:
        calibration = self.calibration(profile)
        if calibration is not None:
            return calibration.honest_floor
        return tolerance_for(profile).threshold / DEFAULT_FLOOR_RATIO
