"""The ledger's HTTP API (FastAPI): signed writes, public reads, proofs; errors as 4xx JSON.

Every error is ``{"error": "<message>"}`` with a 4xx status: 401 for a missing, malformed or
forged signature and a stale timestamp, 409 for a replayed nonce or a refusal by the rules
(insufficient balance, ticket overspent), 403 for operator-only actions, 404 for unknown
things, 413 for a body over the limit, 422 (or 400) for malformed input. The interactive
OpenAPI document is served at ``/docs``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corolla.errors import CorollaError, InvalidInput, LedgerRefused, VerificationError
from corolla.ledger.api.envelope import (
    HEADER_AUTHOR,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Envelope,
)
from corolla.ledger.api.models import Account
from corolla.ledger.bodies import (
    BuyTicketBody,
    EvidenceBody,
    PairsBody,
    RegisterBody,
    ReportBody,
    SlashBody,
)
from corolla.ledger.reader import LedgerReader
from corolla.ledger.store import LedgerStore
from corolla.verify.fast_encoding import encode

__all__ = ["MAX_PAGE", "create_app"]

_log = logging.getLogger("corolla.ledger")
_HEX32 = r"^[0-9a-f]{64}$"
MAX_PAGE = 1000
"""Most entries, accounts or history rows in one page."""


class BodyLimit:
    """ASGI middleware: buffer a request body up to ``limit`` bytes (``paths`` may allow some
    routes more), answer 413 beyond it."""

    def __init__(self, app: ASGIApp, limit: int, paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope.get("path", ""), self.limit)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    payload = json.dumps({"error": f"request body is larger than {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def create_app(store: LedgerStore) -> FastAPI:
    """The ASGI app serving ``store`` (its writer) with one reader connection per thread."""
    limits = store.limits
    readers = _Readers(store)
    app = FastAPI(
        title="Corolla ledger",
        summary="Bloom points in a tamper-evident, auditable log",
        version="1",
        on_shutdown=[readers.close_all],
    )
    app.add_middleware(
        BodyLimit,
        limit=limits.max_body_bytes,
        paths={"/v1/evidence": limits.max_evidence_body_bytes},
    )
    _install_error_handlers(app)

    def handle(action: str, raw: bytes, headers: dict[str, str | None]) -> Any:
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

    async def submit(action: str, request: Request, headers: dict[str, str | None]) -> Any:
        # Parsing, encoding and signature checks run in the thread pool, off the event loop.
        return await run_in_threadpool(handle, action, await request.body(), headers)

    @app.get("/v1/info", summary="The ledger's identity, rules, limits and size")
    def info() -> dict[str, Any]:
        reader = readers.get()
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
            "tree_size": reader.size(),
        }

    @app.get("/v1/checkpoint", summary="The latest checkpoint signed by the ledger")
    def checkpoint() -> dict[str, Any]:
        latest = readers.get().latest_checkpoint()
        if latest is None:
            raise LedgerRefused("the ledger has signed no checkpoint yet", 404)
        return latest.to_dict()

    @app.get("/v1/proofs/inclusion", summary="Audit path of an entry in a tree size")
    def inclusion(
        index: Annotated[int, Query(ge=0, le=2**62)], size: Annotated[int, Query(ge=1, le=2**62)]
    ) -> dict[str, Any]:
        leaf, proof = readers.get().inclusion_proof(index, size)
        return {"index": index, "size": size, "leaf_hash": leaf.hex(), "proof": _hexes(proof)}

    @app.get("/v1/proofs/consistency", summary="Proof that one tree size extends another")
    def consistency(
        first: Annotated[int, Query(ge=0, le=2**62)], second: Annotated[int, Query(ge=0, le=2**62)]
    ) -> dict[str, Any]:
        proof = readers.get().consistency_proof(first, second)
        return {"first": first, "second": second, "proof": _hexes(proof)}

    @app.get("/v1/entries", summary="Entries in order, with the operations behind them")
    def entries(start: Annotated[int, Query(ge=0, le=2**62)] = 0, limit: Page = 100) -> Any:
        return readers.get().page(start, limit)

    @app.get("/v1/accounts", summary="All accounts in key order (paged)")
    def accounts(
        after: Annotated[str, Query(pattern=r"^([0-9a-f]{64})?$")] = "", limit: Page = 100
    ) -> Any:
        rows = readers.get().accounts(bytes.fromhex(after), limit)
        return {"accounts": [_account(row) for row in rows]}

    @app.get("/v1/accounts/{key}", summary="An account's balance and reputation")
    def account(key: Annotated[str, Path(pattern=_HEX32)]) -> Any:
        row = readers.get().account(bytes.fromhex(key))
        if row is None:
            raise LedgerRefused(f"no account {key[:16]}", 404)
        return _account(row)

    @app.get("/v1/accounts/{key}/history", summary="An account's entries, newest first")
    def history(
        key: Annotated[str, Path(pattern=_HEX32)],
        before: Annotated[int | None, Query(ge=0, le=2**62)] = None,
        limit: Page = 100,
    ) -> Any:
        rows = readers.get().history(bytes.fromhex(key), before, limit)
        return {"entries": [entry.to_dict() for entry in rows]}

    @app.get("/v1/top", summary="The leaderboard")
    def top(
        by: Annotated[str, Query(pattern="^(balance|reputation)$")] = "balance", limit: Page = 10
    ) -> Any:
        return {"accounts": [_account(row) for row in readers.get().top(by, limit)]}

    @app.get("/v1/tickets/{digest}", summary="A sold ticket and how much of it was redeemed")
    def ticket(digest: Annotated[str, Path(pattern=_HEX32)]) -> Any:
        found = readers.get().ticket(bytes.fromhex(digest))
        if found is None:
            raise LedgerRefused("no such ticket", 404)
        sold, spent = found
        return {"ticket": sold.to_dict(), "spent": spent}

    @app.post("/v1/accounts", summary="Register the signing key as an account (signed)")
    async def register(request: Request, body: RegisterBody, auth: Signed) -> Any:
        return await submit("register", request, auth)

    # The report, redemption and evidence bodies are documented by their models but parsed by
    # the rules' strict readers (the biggest bodies: validating them twice costs more than the
    # signatures).
    def documented(model: str) -> dict[str, Any]:
        schema = {"$ref": _ref(model)}
        return {
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        }

    @app.post(
        "/v1/reports",
        summary="A client reports its sessions' pairs and spot-check attestations (signed)",
        openapi_extra=documented("ReportBody"),
    )
    async def report(request: Request, auth: Signed) -> Any:
        return await submit("report", request, auth)

    @app.post("/v1/work", include_in_schema=False)
    async def work() -> Any:
        raise LedgerRefused(
            "POST /v1/work was removed: work earns points only in a client's report with "
            "spot-check attestations (POST /v1/reports)",
            410,
        )

    @app.post("/v1/tickets", summary="Buy a priority ticket with points (signed)")
    async def buy_ticket(request: Request, body: BuyTicketBody, auth: Signed) -> Any:
        return await submit("buy-ticket", request, auth)

    @app.post(
        "/v1/tickets/redeem",
        summary="Redeem ticketed receipts (signed)",
        openapi_extra=documented("PairsBody"),
    )
    async def redeem(request: Request, auth: Signed) -> Any:
        return await submit("redeem", request, auth)

    @app.post(
        "/v1/evidence",
        summary="Submit fraud evidence: judged, and the accused slashed when proven (signed)",
        openapi_extra=documented("EvidenceBody"),
        responses={202: {"description": "logged but not judged: it convicts nobody"}},
    )
    async def evidence(request: Request, auth: Signed) -> Any:
        result = await submit("evidence", request, auth)
        return JSONResponse(result, status_code=202 if result["verdict"] == "unjudged" else 200)

    @app.post("/v1/slash", summary="Operator only: slash an account on logged evidence (signed)")
    async def slash(request: Request, body: SlashBody, auth: Signed) -> Any:
        return await submit("slash", request, auth)

    _document(app, PairsBody, ReportBody, EvidenceBody)
    return app


def _ref(model: str) -> str:
    return f"#/components/schemas/{model}"


def _document(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add ``models`` (and the models they nest) to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=_ref("{model}"))
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
Page = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")]


class _Readers:
    """One read connection per worker thread, all closed at shutdown."""

    def __init__(self, store: LedgerStore) -> None:
        self._path = store.path
        self._local = threading.local()
        self._all: list[LedgerReader] = []
        self._lock = threading.Lock()

    def get(self) -> LedgerReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = LedgerReader.open(self._path)
            self._local.reader = reader
            with self._lock:
                self._all.append(reader)
        return reader

    def close_all(self) -> None:
        with self._lock:
            for reader in self._all:
                reader.close()
            self._all.clear()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LedgerRefused)
    async def refused(_: Request, error: LedgerRefused) -> JSONResponse:
        return _error(error.status_code, str(error))

    @app.exception_handler(VerificationError)
    async def unverified(_: Request, error: VerificationError) -> JSONResponse:
        return _error(400, f"verification failed: {error}")

    @app.exception_handler(CorollaError)
    async def invalid(_: Request, error: CorollaError) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(422, f"invalid request: {where}: {first.get('msg', 'malformed')}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        _log.exception("internal error")
        return _error(500, "internal error")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _account(account: Account) -> dict[str, Any]:
    return {
        "account": account.key.hex(),
        "name": account.name,
        "balance": account.balance,
        "reputation": account.reputation,
        "slashed": account.slashed,
    }


def _hexes(hashes: list[bytes]) -> list[str]:
    return [item.hex() for item in hashes]


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a number JSON allows")
