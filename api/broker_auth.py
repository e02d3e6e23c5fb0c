"""The endpoints RabbitMQ's `rabbitmq_auth_backend_http` calls to admit devices.

They are served only on the api's internal listener (`GATEWAY_API_INTERNAL_PORT`, bound to the
internal interface), never on the public one, and they answer `deny` on any error. RabbitMQ
checks its internal users (the services' accounts) first; everyone else is a device, and every
check must come from the device's own MQTT session (`gateway.amqp.access.own_session`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import PlainTextResponse

from api.context import Context, context
from gateway.amqp import access
from gateway.contract.credentials import token_hash
from gateway.contract.topics import DEVICE_ID_RE
from gateway.runtime import metrics
from gateway.storage import registry

log = logging.getLogger(__name__)

ALLOW = PlainTextResponse("allow")
DENY = PlainTextResponse("deny")
MAX_FORM_BYTES = 4096
#: The reason counted for a token that no device has (refused without a database query).
UNKNOWN_TOKEN = "unknown_token"


async def internal_only(request: Request, ctx: Annotated[Context, Depends(context)]) -> None:
    """404 unless the request came in on the internal listener."""
    server = request.scope.get("server")
    if not server or server[1] != ctx.settings.api_internal_port:
        raise HTTPException(404, "Not Found")


router = APIRouter(
    prefix="/internal/rabbitmq", include_in_schema=False, dependencies=[Depends(internal_only)]
)


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ValueError("form too large")
    pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=20)
    return dict(pairs)


async def _decide(
    request: Request, check: Callable[..., bool | Awaitable[bool]], *fields: str
) -> PlainTextResponse:
    """`check(username, *fields from the form)`; any error at all is a `deny`."""
    try:
        form = await _form(request)
        username = form.get("username", "")
        if not DEVICE_ID_RE.fullmatch(username):
            return DENY
        # The MQTT client id: `client_id` on most checks, `variable_map.client_id` on topics.
        client_id = form.get("client_id", form.get("variable_map.client_id", ""))
        if not access.own_session(username, client_id):
            metrics.AUTH_FAILURES.labels("mqtt", "client_id").inc()
            log.info("refused %r: its client id is not its device id", username)
            return DENY
        verdict = check(username, *(form.get(name, "") for name in fields))
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return ALLOW if verdict else DENY
    except Exception:  # deny on any error, and say so without the form (it holds a token)
        log.exception("broker auth check failed; denied")
        return DENY


@router.post("/user")
async def user(request: Request, ctx: Annotated[Context, Depends(context)]) -> PlainTextResponse:
    async def check(username: str, password: str) -> bool:
        def run() -> registry.Verdict:
            with ctx.reads.connect() as conn:
                return registry.authenticate(conn, username, password)

        if not ctx.tokens.may_exist(token_hash(password)):
            # A token no device has: refused without a query (a stranger guessing costs
            # nothing), and counted apart.
            metrics.AUTH_FAILURES.labels("mqtt", UNKNOWN_TOKEN).inc()
            return False
        verdict = await asyncio.to_thread(run)
        if verdict != registry.Verdict.OK:
            metrics.AUTH_FAILURES.labels("mqtt", verdict.value).inc()
            log.info("MQTT login refused for %r: %s", username, verdict.value)
        return verdict == registry.Verdict.OK

    return await _decide(request, check, "password")


@router.post("/vhost")
async def vhost(request: Request) -> PlainTextResponse:
    # RabbitMQ asks this only after `user` admitted the device (registered, enabled, token).
    return await _decide(request, access.vhost_allowed, "vhost")


@router.post("/resource")
async def resource(request: Request) -> PlainTextResponse:
    return await _decide(request, access.resource_allowed, "resource", "name", "permission")


@router.post("/topic")
async def topic(request: Request) -> PlainTextResponse:
    return await _decide(request, access.topic_allowed, "name", "permission", "routing_key")
