"""The HTTP routes of checks v2 (``docs/checks-protocol.md``), one router per resource;
:func:`corolla.ledger.app.create_app` mounts them beside :mod:`corolla.ledger.routes`.

- :data:`beacons`       ``GET /v1/beacon`` (the current epoch's), ``GET /v1/beacon/{epoch}``
  (425 for an epoch that has not begun)
- :data:`serving`       ``POST /v1/serving`` (a node declares what it serves, signed),
  ``POST /v1/serving/withdraw``, ``GET /v1/serving`` (who declared a span before an epoch)
- :data:`calibrations`  ``POST /v1/calibrations`` (operator only), ``GET
  /v1/calibrations/{model}``
- :data:`disputes`      ``POST /v1/disputes`` (decided by the referee, or logged unjudged)
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from corolla.errors import LedgerRefused
from corolla.ledger.api.checks import Serving
from corolla.ledger.bodies import CalibrationsBody, ServingBody
from corolla.ledger.routes import Served, Signed, documented, submit
from corolla.verify.beacon import epoch_start
from corolla.verify.encoding import INT_MAX
from corolla.verify.receipts import MAX_BLOCK

__all__ = ["beacons", "calibrations", "disputes", "serving"]

Epoch = Annotated[int, Path(ge=0, le=INT_MAX, description="a beacon epoch")]
Block = Annotated[int, Query(ge=0, le=MAX_BLOCK)]

# ---------------------------------------------------------------------------------------------
# The beacon

beacons = APIRouter(prefix="/v1", tags=["beacon"])


@beacons.get("/beacon", summary="The ledger's signed beacon of the current epoch")
def current_beacon(ledger: Served) -> dict[str, Any]:
    return ledger.store.beacon().to_dict()


@beacons.get(
    "/beacon/{epoch}",
    summary="The ledger's signed beacon of an epoch that has begun",
    responses={425: {"description": "the epoch has not begun: its beacon is not revealed yet"}},
)
def beacon(epoch: Epoch, ledger: Served) -> dict[str, Any]:
    return ledger.store.beacon(epoch).to_dict()


# ---------------------------------------------------------------------------------------------
# Serving declarations

serving = APIRouter(prefix="/v1", tags=["serving"])


@serving.post("/serving", summary="A node declares a span it serves under a profile (signed)")
async def declare(request: Request, body: ServingBody, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "serving", request, auth)


@serving.post("/serving/withdraw", summary="A node withdraws a serving declaration (signed)")
async def withdraw(request: Request, body: ServingBody, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "serving-withdraw", request, auth)


@serving.get(
    "/serving",
    summary="Keys of the nodes whose declarations cover a span, as they stood when an epoch began",
    responses={425: {"description": "the epoch has not begun"}},
)
def servers(
    ledger: Served,
    model: Annotated[str, Query(pattern=r"^[0-9a-f]{64}$")],
    start: Block,
    end: Block,
    profile: Annotated[str, Query(pattern=r"^[a-z0-9]{1,16}$")],
    before: Annotated[
        int | None,
        Query(ge=0, le=INT_MAX, description="epoch: declarations logged before it began"),
    ] = None,
) -> dict[str, Any]:
    store = ledger.store
    wanted = Serving(bytes.fromhex(model), start, end, profile)
    if before is None:
        moment = store.clock() + 1
    else:
        if before > store.current_epoch():
            raise LedgerRefused(f"epoch {before} has not begun: its candidates may change", 425)
        moment = epoch_start(before, store.rules.beacon_period_s) * 1000
    keys = ledger.reader().servers(wanted, moment)
    return {"servers": [key.hex() for key in keys], "epoch": before, "before_ms": moment}


# ---------------------------------------------------------------------------------------------
# Published calibrations

calibrations = APIRouter(prefix="/v1", tags=["calibrations"])


@calibrations.post("/calibrations", summary="Operator only: publish calibrations (signed)")
async def publish(request: Request, body: CalibrationsBody, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "calibrate", request, auth)


@calibrations.get(
    "/calibrations/{model}", summary="The latest published calibration of each profile of a model"
)
def model_calibrations(
    model: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")], ledger: Served
) -> dict[str, Any]:
    latest = ledger.reader().calibrations(bytes.fromhex(model))
    return {
        "model": model,
        "calibrations": [
            {"calibration": wire, "seq": seq, "time": time} for seq, time, wire in latest
        ],
    }


# ---------------------------------------------------------------------------------------------
# Disputes

disputes = APIRouter(prefix="/v1", tags=["disputes"])


@disputes.post(
    "/disputes",
    summary="A client's dispute: decided by the ledger's referee (signed)",
    openapi_extra=documented("DisputeBody"),
    responses={202: {"description": "logged unjudged: it slashes nobody"}},
)
async def dispute(request: Request, auth: Signed, ledger: Served) -> Any:
    result = await submit(ledger, "dispute", request, auth)
    return JSONResponse(result, status_code=200 if result["judged"] else 202)
