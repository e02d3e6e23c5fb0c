"""The FastAPI application: HTTP ingest, operator reads, health and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import broker_auth, commands, ingest, operators
from api.command_hub import CommandHub
from api.context import Context
from api.stream import StatusStream
from api.tokens import TokenCache
from gateway import logs, queries
from gateway.broker import Forwarder, Publisher, connect
from gateway.db import is_cancelled, is_transient, make_engine
from gateway.dispatcher import Dispatcher
from gateway.errors import InputError
from gateway.health import broker_ready, check_storage, is_ready
from gateway.settings import ApiSettings
from gateway.topics import validate_device_id

log = logging.getLogger(__name__)


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


class RequestId:
    """Give every request an id (the client's X-Request-ID, or a new one): on every log line
    written while it is handled, and in the response. Plain ASGI, so it costs next to nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with logs.request_scope(Headers(scope=scope).get("x-request-id")) as rid:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-request-id", rid.encode("latin-1")),
                    ]
                await send(message)

            await self.app(scope, receive, send_with_id)


def create_server(settings: ApiSettings | None = None) -> ASGIApp:
    """What uvicorn serves."""
    return layered(create_app(settings))


def layered(app: FastAPI) -> ASGIApp:
    """The app behind two thin layers. `FastIngest` takes known devices' heartbeats before
    anything else (it gives its own answers their request id); `RequestId` gives every other
    response its id, errors included."""
    return ingest.FastIngest(app, RequestId(app))


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure(settings.log_level, settings.log_format)  # also in uvicorn's workers
        # Every statement of the api is bounded: a read that would run for minutes answers 503
        # instead of holding a pooled connection (and a thread) for as long.
        timeout_ms = settings.api_statement_timeout_ms
        engine = make_engine(
            str(settings.database_url),
            pool_size=4,
            pre_ping=False,
            statement_timeout_ms=timeout_ms,
        )
        reads = make_engine(
            str(settings.database_url),
            pool_size=10,
            pre_ping=False,
            autocommit=True,
            statement_timeout_ms=timeout_ms,
        )
        cache = redis.Redis.from_url(
            str(settings.redis_url), socket_timeout=1, socket_connect_timeout=1
        )
        connection = await connect(str(settings.amqp_url), name="gateway-api")
        try:
            publisher = await Publisher.open(connection, timeout=settings.api_confirm_timeout_s)
            tokens = TokenCache()
            hub = CommandHub()
            hub.dispatcher = Dispatcher(engine, publisher)
            stream = StatusStream(engine.url, tokens, hub)
            stream.start()
            app.state.context = Context(
                settings,
                engine,
                cache,
                connection,
                publisher,
                stream,
                reads,
                Forwarder(
                    publisher, size=settings.api_batch_size, linger_s=settings.api_linger_ms / 1000
                ),
                tokens=tokens,
                commands=hub,
            )
            stopping = asyncio.Event()
            dispatching = asyncio.create_task(
                hub.dispatcher.run(stopping), name="commands:dispatcher"
            )
            log.info("api ready")
            yield
            stopping.set()
            await dispatching
            stream.stop()
        finally:
            await connection.close()
            engine.dispose()
            reads.dispose()
            cache.close()

    app = FastAPI(
        title="Heartbeat gateway",
        version="0.1.0",
        description="Device heartbeats over MQTT and HTTP; device state and history for operators.",
        lifespan=lifespan,
    )
    app.include_router(ingest.router)
    app.include_router(operators.router)
    app.include_router(commands.operators)
    app.include_router(commands.devices)
    app.include_router(broker_auth.router)

    @app.exception_handler(SQLAlchemyError)
    async def database_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if is_cancelled(exc):
            limit_ms = settings.api_statement_timeout_ms
            log.warning(
                "statement on %s cancelled (GATEWAY_API_STATEMENT_TIMEOUT_MS=%d)",
                request.url.path,
                limit_ms,
            )
            why = "was cancelled"
            if limit_ms:
                why = f"took longer than this api allows ({limit_ms} ms)"
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

    @app.exception_handler(queries.BadCursor)
    async def bad_cursor(request: Request, exc: queries.BadCursor) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
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
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Broker and database reachable (Redis reported, optional)",
        responses={200: {"model": Readiness}, 503: {"model": Readiness}},
    )
    async def readyz(request: Request) -> JSONResponse:
        ctx: Context = request.app.state.context
        storage = await check_storage(ctx.engine, ctx.redis)
        checks = {"rabbitmq": broker_ready(ctx.connection, ctx.publisher), **storage}
        ready = is_ready(checks)
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
