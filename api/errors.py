"""How the api answers what went wrong: a database that is away or too slow (503 with
Retry-After), a bad cursor (400), and invalid input (422 naming each problem, device ids in the
same words as MQTT dead letters)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from gateway.contract.reasons import InputError
from gateway.contract.topics import validate_device_id
from gateway.storage import reads
from gateway.storage.engine import is_cancelled, is_transient

log = logging.getLogger(__name__)


def install(app: FastAPI, statement_timeout_ms: int) -> None:
    @app.exception_handler(SQLAlchemyError)
    async def database_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if is_cancelled(exc):
            log.warning(
                "statement on %s cancelled (GATEWAY_API_STATEMENT_TIMEOUT_MS=%d)",
                request.url.path,
                statement_timeout_ms,
            )
            why = "was cancelled"
            if statement_timeout_ms:
                why = f"took longer than this api allows ({statement_timeout_ms} ms)"
            return JSONResponse(
                {"detail": f"the query {why}; narrow it or retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        if not is_transient(exc):
            raise exc
        log.warning("database error on %s: %s", request.url.path, str(exc).splitlines()[0])
        return JSONResponse(
            {"detail": "the database is unavailable; nothing was changed, retry later"},
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(reads.BadCursor)
    async def bad_cursor(request: Request, exc: reads.BadCursor) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "; ".join(_problems(exc))}, status_code=422)


def _problems(exc: RequestValidationError) -> list[str]:
    problems = []
    for error in exc.errors()[:5]:
        loc = tuple(error.get("loc", ()))
        if loc == ("path", "device_id"):
            try:  # the same message MQTT dead letters carry
                validate_device_id(str(error.get("input", "")))
            except InputError as bad:
                problems.append(bad.detail)
                continue
        name = ".".join(str(p) for p in loc if p not in ("query", "path", "body"))
        problems.append(f"{name}: {error.get('msg', 'invalid')}" if name else error["msg"])
    return problems
