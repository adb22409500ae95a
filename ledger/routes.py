"""The ledger's HTTP routes, one router per resource; :func:`corolla.ledger.app.create_app`
mounts them.

- :data:`reads`   the ledger's identity and rules, entries, accounts, histories, the top,
  sold tickets (public reads)
- :data:`proofs`  the latest signed checkpoint, inclusion and consistency proofs
- :data:`writes`  every signed write: register, report, buy a ticket, redeem, evidence, slash

The routes of checks v2 (beacon, serving declarations, calibrations, disputes) are in
:mod:`corolla.ledger.check_routes`.

Handlers find the store and the per-thread readers through :class:`Ledger`, kept on the app's
state. A write's body is read raw and checked by the store (its signature covers the canonical
bytes of the parsed JSON); the body models in :mod:`corolla.ledger.bodies` document it and
validate the small ones.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from corolla.errors import InvalidInput, LedgerRefused
from corolla.ledger.api.envelope import (
    HEADER_AUTHOR,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Envelope,
)
from corolla.ledger.bodies import BuyTicketBody, RegisterBody, SlashBody
from corolla.ledger.reader import LedgerReader
from corolla.ledger.store import LedgerStore
from corolla.verify.fast import encode

__all__ = [
    "MAX_PAGE",
    "Ledger",
    "Served",
    "Signed",
    "documented",
    "proofs",
    "reads",
    "ref",
    "submit",
    "writes",
]

MAX_PAGE = 1000
"""Most entries, accounts or history rows in one page."""
_HEX32 = r"^[0-9a-f]{64}$"


@dataclass
class Ledger:
    """What the handlers serve: the store (the one writer) and one reader per worker thread,
    all closed by :meth:`close_readers` at shutdown."""

    store: LedgerStore
    _local: threading.local = field(default_factory=threading.local)
    _readers: list[LedgerReader] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reader(self) -> LedgerReader:
        """This thread's read connection (opened on first use)."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = LedgerReader.open(self.store.path)
            self._local.reader = reader
            with self._lock:
                self._readers.append(reader)
        return reader

    def close_readers(self) -> None:
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()


async def _ledger(request: Request) -> Ledger:
    # Async, so it runs on the event loop: the reader is taken in the handler's own thread.
    return request.app.state.ledger  # type: ignore[no-any-return]


Served = Annotated[Ledger, Depends(_ledger)]
Page = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")]
Index = Annotated[int, Query(ge=0, le=2**62)]
HexKey = Annotated[str, Path(pattern=_HEX32)]


def ref(model: str) -> str:
    """The OpenAPI reference of a component schema."""
    return f"#/components/schemas/{model}"


# ---------------------------------------------------------------------------------------------
# Reads: the ledger, its entries and its accounts

reads = APIRouter(prefix="/v1", tags=["reads"])


@reads.get("/info", summary="The ledger's identity, rules, limits and size")
def info(ledger: Served) -> dict[str, Any]:
    store, limits = ledger.store, ledger.store.limits
    return {
        "origin": store.origin,
        "ledger_key": store.identity.public_key.hex(),
        "rules": store.rules.to_dict(),
        "limits": {
            "max_body_bytes": limits.max_body_bytes,
            "max_evidence_body_bytes": limits.max_evidence_body_bytes,
            "max_pairs": limits.max_pairs,
            "max_attestations": limits.max_attestations,
            "max_page": MAX_PAGE,
        },
        "referee": store.referee is not None,
        "tree_size": ledger.reader().size(),
    }


@reads.get("/entries", summary="Entries in order, with the operations behind them")
def entries(ledger: Served, start: Index = 0, limit: Page = 100) -> Any:
    return ledger.reader().page(start, limit)


@reads.get("/accounts", summary="All accounts in key order (paged)")
def accounts(
    ledger: Served,
    after: Annotated[str, Query(pattern=r"^([0-9a-f]{64})?$")] = "",
    limit: Page = 100,
) -> Any:
    rows = ledger.reader().accounts(bytes.fromhex(after), limit)
    return {"accounts": [row.to_dict() for row in rows]}


@reads.get("/accounts/{key}", summary="An account's balance and reputation")
def account(key: HexKey, ledger: Served) -> Any:
    row = ledger.reader().account(bytes.fromhex(key))
    if row is None:
        raise LedgerRefused(f"no account {key[:16]}", 404)
    return row.to_dict()


@reads.get("/accounts/{key}/history", summary="An account's entries, newest first")
def history(
    key: HexKey,
    ledger: Served,
    before: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Page = 100,
) -> Any:
    rows = ledger.reader().history(bytes.fromhex(key), before, limit)
    return {"entries": [entry.to_dict() for entry in rows]}


@reads.get("/top", summary="The leaderboard")
def top(
    ledger: Served,
    by: Annotated[str, Query(pattern="^(balance|reputation)$")] = "balance",
    limit: Page = 10,
) -> Any:
    return {"accounts": [row.to_dict() for row in ledger.reader().top(by, limit)]}


@reads.get("/tickets/{digest}", summary="A sold ticket and how much of it was redeemed")
def ticket(digest: HexKey, ledger: Served) -> Any:
    found = ledger.reader().ticket(bytes.fromhex(digest))
    if found is None:
        raise LedgerRefused("no such ticket", 404)
    sold, spent = found
    return {"ticket": sold.to_dict(), "spent": spent}


# ---------------------------------------------------------------------------------------------
# Proofs: what a client checks the log with

proofs = APIRouter(prefix="/v1", tags=["proofs"])


@proofs.get("/checkpoint", summary="The latest checkpoint signed by the ledger")
def checkpoint(ledger: Served) -> dict[str, Any]:
    latest = ledger.reader().latest_checkpoint()
    if latest is None:
        raise LedgerRefused("the ledger has signed no checkpoint yet", 404)
    return latest.to_dict()


@proofs.get("/proofs/inclusion", summary="Audit path of an entry in a tree size")
def inclusion(
    ledger: Served, index: Index, size: Annotated[int, Query(ge=1, le=2**62)]
) -> dict[str, Any]:
    leaf, proof = ledger.reader().inclusion_proof(index, size)
    return {"index": index, "size": size, "leaf_hash": leaf.hex(), "proof": _hexes(proof)}


@proofs.get("/proofs/consistency", summary="Proof that one tree size extends another")
def consistency(ledger: Served, first: Index, second: Index) -> dict[str, Any]:
    proof = ledger.reader().consistency_proof(first, second)
    return {"first": first, "second": second, "proof": _hexes(proof)}


def _hexes(hashes: list[bytes]) -> list[str]:
    return [item.hex() for item in hashes]


# ---------------------------------------------------------------------------------------------
# Writes: every one signed (the envelope's headers), applied by the store


def _envelope_headers(
    author: Annotated[
        str | None, Header(alias=HEADER_AUTHOR, description="author's public key, hex")
    ] = None,
    nonce: Annotated[
        str | None, Header(alias=HEADER_NONCE, description="16 random bytes, hex")
    ] = None,
    timestamp: Annotated[
        str | None, Header(alias=HEADER_TIMESTAMP, description="ms since the epoch")
    ] = None,
    signature: Annotated[
        str | None, Header(alias=HEADER_SIGNATURE, description="Ed25519 signature, hex")
    ] = None,
) -> dict[str, str | None]:
    """The signed envelope's headers (checked by the store, so that a missing one is a 401)."""
    return {
        HEADER_AUTHOR: author,
        HEADER_NONCE: nonce,
        HEADER_TIMESTAMP: timestamp,
        HEADER_SIGNATURE: signature,
    }


Signed = Annotated[dict[str, str | None], Depends(_envelope_headers)]

writes = APIRouter(prefix="/v1", tags=["writes"])


def documented(model: str) -> dict[str, Any]:
    """The request body of a route that reads its body raw: documented by ``model``.

    The report, redemption and evidence bodies are parsed by the rules' strict readers (the
    biggest bodies: validating them twice costs more than the signatures)."""
    schema = {"$ref": ref(model)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def submit(ledger: Ledger, action: str, request: Request, headers: dict[str, Any]) -> Any:
    # Parsing, encoding and signature checks run in the thread pool, off the event loop.
    raw = await request.body()
    return await run_in_threadpool(_apply, ledger.store, action, raw, headers)


def _apply(store: LedgerStore, action: str, raw: bytes, headers: dict[str, str | None]) -> Any:
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"body is not JSON: {error}") from None
    body = encode(value)
    present = {name: text for name, text in headers.items() if text is not None}
    try:
        envelope = Envelope.from_headers(present, action, body)
    except InvalidInput as error:
        raise LedgerRefused(str(error), 401) from None
    return store.submit_encoded(envelope, value, body)


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a number JSON allows")


@writes.post("/accounts", summary="Register the signing key as an account (signed)")
async def register(request: Request, body: RegisterBody, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "register", request, auth)


@writes.post(
    "/reports",
    summary="A client reports its sessions' pairs and spot-check attestations (signed)",
    openapi_extra=documented("ReportBody"),
)
async def report(request: Request, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "report", request, auth)


@writes.post("/tickets", summary="Buy a priority ticket with points (signed)")
async def buy_ticket(request: Request, body: BuyTicketBody, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "buy-ticket", request, auth)


@writes.post(
    "/tickets/redeem",
    summary="Redeem ticketed receipts (signed)",
    openapi_extra=documented("PairsBody"),
)
async def redeem(request: Request, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "redeem", request, auth)


@writes.post(
    "/evidence",
    summary="Submit fraud evidence: judged, and the accused slashed when proven (signed)",
    openapi_extra=documented("EvidenceBody"),
    responses={202: {"description": "logged but not judged: it convicts nobody"}},
)
async def evidence(request: Request, auth: Signed, ledger: Served) -> Any:
    result = await submit(ledger, "evidence", request, auth)
    return JSONResponse(result, status_code=202 if result["verdict"] == "unjudged" else 200)


@writes.post("/slash", summary="Operator only: slash an account on logged evidence (signed)")
async def slash(request: Request, body: SlashBody, auth: Signed, ledger: Served) -> Any:
    return await submit(ledger, "slash", request, auth)
