"""The api process's app: wiring only. Routes live by concern (`health`, `ingest`, `operators`,
`commands`, `broker_auth`), error answers in `errors`, the connections (and the command
dispatcher) in `context`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

import gateway
from api import broker_auth, commands, errors, health, ingest, operators
from api.context import open_context
from api.middleware import RequestId
from gateway.runtime import logs
from gateway.runtime.settings import ApiSettings

log = logging.getLogger(__name__)


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
        async with open_context(settings) as context:
            app.state.context = context
            log.info("api ready")
            yield

    app = FastAPI(
        title="Heartbeat gateway",
        version=gateway.__version__,
        description="Device heartbeats over MQTT and HTTP; device state and history for operators.",
        lifespan=lifespan,
    )
    errors.install(app, settings.api_statement_timeout_ms)
    for router in (
        ingest.router,
        operators.router,
        commands.operators,
        commands.devices,
        broker_auth.router,
        health.router,
    ):
        app.include_router(router)
    return app
