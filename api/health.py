"""`/healthz`, `/readyz` and `/metrics`: what orchestrators and Prometheus ask."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from api.context import Context
from gateway.amqp.connection import broker_ready
from gateway.runtime import metrics
from gateway.runtime.health import is_ready
from gateway.storage.engine import check_storage

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Broker and database reachable (Redis reported, optional)",
    responses={200: {"model": Readiness}, 503: {"model": Readiness}},
)
async def readyz(request: Request) -> JSONResponse:
    ctx: Context = request.app.state.context
    storage = await check_storage(ctx.engine, ctx.redis)
    checks = {"rabbitmq": broker_ready(ctx.connection, ctx.publisher), **storage}
    ready = is_ready(checks)
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}},
)
async def prometheus() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
