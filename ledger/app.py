"""The ledger's HTTP API (FastAPI): the routers of :mod:`corolla.ledger.routes` (public reads,
proofs, signed writes) behind a body-size limit; errors as 4xx JSON.

Every error is ``{"error": "<message>"}`` with a 4xx status: 401 for a missing, malformed or
forged signature and a stale timestamp, 409 for a replayed nonce or a refusal by the rules
(insufficient balance, ticket overspent), 403 for operator-only actions, 404 for unknown
things, 413 for a body over the limit, 422 (or 400) for malformed input, 425 for a beacon (or
the candidates) of an epoch that has not begun. The interactive
OpenAPI document is served at ``/docs``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corolla.errors import CorollaError, LedgerRefused, VerificationError
from corolla.ledger.bodies import DisputeBody, EvidenceBody, PairsBody, ReportBody
from corolla.ledger.check_routes import beacons, calibrations, disputes, serving
from corolla.ledger.routes import MAX_PAGE, Ledger, proofs, reads, ref, writes
from corolla.ledger.store import LedgerStore

__all__ = ["MAX_PAGE", "BodyLimit", "create_app"]

_log = logging.getLogger("corolla.ledger")


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
    ledger = Ledger(store)
    app = FastAPI(
        title="Corolla ledger",
        summary="Bloom points in a tamper-evident, auditable log",
        version="1",
        on_shutdown=[ledger.close_readers],
    )
    app.state.ledger = ledger
    app.add_middleware(
        BodyLimit,
        limit=store.limits.max_body_bytes,
        paths={
            "/v1/evidence": store.limits.max_evidence_body_bytes,
            "/v1/disputes": store.limits.max_evidence_body_bytes,
        },
    )
    _install_error_handlers(app)
    for router in (reads, proofs, writes, beacons, serving, calibrations, disputes):
        app.include_router(router)
    _document(app, PairsBody, ReportBody, EvidenceBody, DisputeBody)
    return app


def _document(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add ``models`` (and the models they nest) to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=ref("{model}"))
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
