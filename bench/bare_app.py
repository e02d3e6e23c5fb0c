"""The uvicorn ceiling: the same server, a handler that answers 202 and does no work."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def accept(request) -> JSONResponse:
    await request.body()
    return JSONResponse({"id": "0"}, status_code=202)


app = Starlette(routes=[Route("/api/v1/devices/{device_id}/heartbeats", accept, methods=["POST"])])
