"""The endpoints RabbitMQ's `rabbitmq_auth_backend_http` calls to admit devices.

They are served only on the api's internal listener (`GATEWAY_API_INTERNAL_PORT`, bound to the
internal interface), never on the public one, and they answer `deny` on any error. RabbitMQ
checks its internal users (the services' accounts) first; everyone else is a device.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import PlainTextResponse

from api.context import Context, context
from gateway import access, metrics, registry
from gateway.topics import DEVICE_ID_RE

log = logging.getLogger(__name__)
router = APIRouter(prefix="/internal/rabbitmq", include_in_schema=False)

ALLOW = PlainTextResponse("allow")
DENY = PlainTextResponse("deny")
MAX_FORM_BYTES = 4096


async def internal_only(request: Request, ctx: Annotated[Context, Depends(context)]) -> None:
    """404 unless the request came in on the internal listener."""
    server = request.scope.get("server")
    if not server or server[1] != ctx.settings.api_internal_port:
        raise HTTPException(404, "Not Found")


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ValueError("form too large")
    pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=20)
    return dict(pairs)


async def _decide(
    request: Request, decide: Callable[[dict[str, str]], bool | str]
) -> PlainTextResponse:
    """Run a decision; any error at all is a `deny`."""
    try:
        form = await _form(request)
        username = form.get("username", "")
        if not DEVICE_ID_RE.fullmatch(username):
            return DENY
        verdict = decide(form)
        if asyncio.iscoroutine(verdict):
            verdict = await verdict
        return ALLOW if verdict is True else DENY
    except Exception:  # deny on any error, and say so without the form (it holds a token)
        log.exception("broker auth check failed; denied")
        return DENY


router_dependencies = [Depends(internal_only)]


@router.post("/user", dependencies=router_dependencies)
async def user(request: Request, ctx: Annotated[Context, Depends(context)]) -> PlainTextResponse:
    async def check(form: dict[str, str]) -> bool:
        def run() -> registry.Verdict:
            with ctx.reads.connect() as conn:
                return registry.authenticate(conn, form["username"], form.get("password", ""))

        verdict = await asyncio.to_thread(run)
        if verdict != registry.Verdict.OK:
            metrics.AUTH_FAILURES.labels("mqtt", verdict.value).inc()
            log.info("MQTT login refused for %r: %s", form["username"], verdict.value)
        return verdict == registry.Verdict.OK

    return await _decide(request, check)


@router.post("/vhost", dependencies=router_dependencies)
async def vhost(request: Request) -> PlainTextResponse:
    # RabbitMQ asks this only after `user` admitted the device (registered, enabled, token).
    return await _decide(request, lambda f: access.vhost_allowed(f["username"], f.get("vhost", "")))


@router.post("/resource", dependencies=router_dependencies)
async def resource(request: Request) -> PlainTextResponse:
    return await _decide(
        request,
        lambda f: access.resource_allowed(
            f["username"], f.get("resource", ""), f.get("name", ""), f.get("permission", "")
        ),
    )


@router.post("/topic", dependencies=router_dependencies)
async def topic(request: Request) -> PlainTextResponse:
    return await _decide(
        request,
        lambda f: access.topic_allowed(
            f["username"], f.get("name", ""), f.get("permission", ""), f.get("routing_key", "")
        ),
    )
