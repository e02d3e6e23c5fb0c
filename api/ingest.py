"""HTTP ingest for devices that cannot speak MQTT: the same payload, the same pipeline."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from api.command_hub import commands_for_heartbeat
from api.context import Context, DevicePath, context
from api.responses import errors, unauthorized
from gateway.amqp.publisher import PublishFailed
from gateway.contract.commands import CommandMessage
from gateway.contract.conversion import heartbeat_from
from gateway.contract.credentials import token_hash
from gateway.contract.messages import Rejection, Source, utcnow
from gateway.contract.payload import MAX_PAYLOAD_BYTES, wire_schema
from gateway.contract.reasons import InputError, Reason, unforeseen
from gateway.contract.topics import DEVICE_ID_RE
from gateway.runtime import logs, metrics
from gateway.storage import registry

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["devices"])

STATUS_FOR_REASON = {
    Reason.TOO_LARGE: status.HTTP_413_CONTENT_TOO_LARGE,
    Reason.NOT_JSON: status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
    Reason.NOT_UTF8: status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
}
#: The ingest route's path, for requests served by `FastIngest`.
INGEST_PATH = re.compile(rf"/api/v1/devices/({DEVICE_ID_RE.pattern})/heartbeats")
JSON_TYPES = ("application/json", "text/json")
RECEIVED_HTTP = metrics.RECEIVED.labels(Source.HTTP.value)
device_bearer = HTTPBearer(auto_error=False, description="The device's token")


class Accepted(BaseModel):
    #: The heartbeat's id; the same id for a retry with the same msg_id.
    id: str
    #: The device's live commands, the oldest first (`README`, "Commands to devices").
    commands: list[CommandMessage] = []


async def read_body(
    headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int = MAX_PAYLOAD_BYTES
) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(
            Reason.TOO_LARGE, f"payload is {int(declared)} bytes; the limit is {limit}"
        )
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise InputError(Reason.TOO_LARGE, f"payload is over the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def with_content_type_hint(headers: Mapping[str, str], error: InputError) -> InputError:
    """Bodies are parsed whatever their Content-Type (simple clients send `text/plain` or a
    form type); when one is not JSON, the message says what the client declared."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if error.reason not in (Reason.NOT_JSON, Reason.NOT_UTF8) or not content_type:
        return error
    if content_type in JSON_TYPES or content_type.endswith("+json"):
        return error
    return InputError(error.reason, f"{error.detail} (Content-Type was {content_type!r})")


@router.post(
    "/devices/{device_id}/heartbeats",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a heartbeat over HTTP",
    responses=errors(401, 403, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": wire_schema()}},
        }
    },
)
async def post_heartbeat(
    device_id: DevicePath,
    request: Request,
    ctx: Annotated[Context, Depends(context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(device_bearer)],
) -> Accepted:
    """Answers 202 only once the broker has confirmed the heartbeat on a durable queue."""
    received_at = utcnow()
    await authenticate_device(ctx, device_id, credentials)
    return await accept(
        ctx, device_id, request.headers, request.stream(), request.url.path, received_at
    )


async def accept(
    ctx: Context,
    device_id: str,
    headers: Mapping[str, str],
    body: AsyncIterator[bytes],
    path: str,
    received_at: datetime,
) -> Accepted:
    """An authenticated device's heartbeat: read, parse, forward, and wait for the broker's
    confirm. Refused input is dead-lettered; every refusal is an HTTPException for the client
    (a 4xx for anything in the body, even what nobody foresaw; a 503 when the broker is away)."""
    raw = b""
    try:
        raw = await read_body(headers, body)
        heartbeat = heartbeat_from(device_id, raw, Source.HTTP, received_at)
    except InputError as error:
        error = with_content_type_hint(headers, error)
        raise await refuse(ctx, error, raw, device_id, path) from None
    try:
        await ctx.forwarder.forward(heartbeat)
    except PublishFailed as exc:
        raise unconfirmed(
            device_id, "heartbeat", exc, "retry later (with the same msg_id it is stored once)"
        ) from None
    except Exception as exc:  # not the broker: it would fail again, so it is refused
        error = unforeseen(exc, "a heartbeat over http to forward")
        raise await refuse(ctx, error, raw, device_id, path) from None
    RECEIVED_HTTP.inc()
    return Accepted(id=str(heartbeat.id), commands=await commands_for_heartbeat(ctx, device_id))


async def refuse(
    ctx: Context, error: InputError, raw: bytes, device_id: str, path: str
) -> HTTPException:
    """Dead-letter refused input from a device over HTTP; the client's answer says why."""
    await _dead_letter(ctx, error, raw, device_id, path)
    return HTTPException(
        STATUS_FOR_REASON.get(error.reason, status.HTTP_422_UNPROCESSABLE_CONTENT), error.detail
    )


def unconfirmed(device_id: str, what: str, exc: PublishFailed, retry: str) -> HTTPException:
    """The broker did not confirm what a device sent over HTTP: a 503 it may retry."""
    metrics.PUBLISH_FAILURES.labels("api").inc()
    log.warning("%s from %s not accepted: %s", what, device_id, exc)
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"the broker did not confirm the {what}; {retry}",
        headers={"Retry-After": "1"},
    )


class FastIngest:
    """`POST /api/v1/devices/{id}/heartbeats` from a device whose token this process has
    already checked, served without FastAPI's middleware, routing and dependency solving,
    which cost several times the heartbeat's own work. From the token on it runs the route's
    own code (`accept`) and answers what the route would. Every other request, including a
    heartbeat with no token, an unknown one, another device's or a disabled device's, goes to
    the app, whose route answers it.
    """

    def __init__(self, app: FastAPI, others: ASGIApp) -> None:
        self.app = app
        #: What serves every other request: `app`, behind its outer layers.
        self.next = others

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = INGEST_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.next(scope, receive, send)
            return
        ctx: Context = self.app.state.context
        headers = _first_headers(scope)
        device_id = route.group(1)
        if not _known_sender(ctx, headers.get("authorization"), device_id):
            await self.next(scope, receive, send)
            return
        received_at = utcnow()
        with logs.request_scope(headers.get("x-request-id")) as rid:
            await self._accept(scope, receive, send, ctx, device_id, headers, rid, received_at)

    async def _accept(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: Context,
        device_id: str,
        headers: dict[str, str],
        rid: str,
        received_at: datetime,
    ) -> None:
        request = Request(scope, receive)
        try:
            accepted = await accept(
                ctx, device_id, headers, request.stream(), scope["path"], received_at
            )
        except HTTPException as exc:
            response = await http_exception_handler(request, exc)
            response.headers["x-request-id"] = rid
            await response(scope, receive, send)
            return
        body = orjson.dumps(
            {"id": accepted.id, "commands": [c.model_dump(mode="json") for c in accepted.commands]}
        )
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [
                    (b"content-length", b"%d" % len(body)),
                    (b"content-type", b"application/json"),
                    (b"x-request-id", rid.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _first_headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name, the first of each name winning, as in
    Starlette's `Headers.get` (one pass, instead of one scan of the list per header read)."""
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in reversed(scope["headers"])
    }


def _known_sender(ctx: Context, authorization: str | None, device_id: str) -> bool:
    """The token is one this process already checked, of this device, and it is enabled.
    (The header is read as `device_bearer` reads it.)"""
    scheme, token = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not token:
        return False
    identity = ctx.tokens.get(token_hash(token))
    return identity is not None and identity.device_id == device_id and identity.enabled


async def authenticate_device(
    ctx: Context, device_id: str, credentials: HTTPAuthorizationCredentials | None
) -> None:
    """401 without a valid device token, 403 with another device's token or when disabled."""
    if credentials is None:
        raise _refused(
            "missing_token",
            unauthorized("missing device token: send Authorization: Bearer <device token>"),
        )
    digest = token_hash(credentials.credentials)
    invalid = "invalid device token (unknown, or replaced by a rotation)"
    if not ctx.tokens.may_exist(digest):  # no device has it: refused without a query
        raise _refused("unknown_token", unauthorized(invalid))
    identity = await _identify(ctx, digest)
    if identity is None:
        raise _refused("bad_token", unauthorized(invalid))
    if identity.device_id != device_id:
        raise _refused(
            "other_device",
            HTTPException(
                status.HTTP_403_FORBIDDEN, f"this token may not send heartbeats for {device_id!r}"
            ),
        )
    if not identity.enabled:
        raise _refused(
            "disabled",
            HTTPException(status.HTTP_403_FORBIDDEN, f"device {device_id!r} is disabled"),
        )


async def _identify(ctx: Context, digest: str) -> registry.Identity | None:
    """The device a token hash belongs to: from this process's cache, else PostgreSQL."""

    def lookup() -> registry.Identity | None:
        with ctx.reads.connect() as conn:
            return registry.identify(conn, digest)

    return await ctx.tokens.lookup(digest, lambda: asyncio.to_thread(lookup))


def _refused(reason: str, error: HTTPException) -> HTTPException:
    metrics.AUTH_FAILURES.labels("http", reason).inc()
    return error


async def _dead_letter(
    ctx: Context, error: InputError, body: bytes, device_id: str, path: str
) -> None:
    """Keep refused input as a dead letter too (best effort: the client has its 4xx)."""
    metrics.REJECTED.labels(Source.HTTP.value, error.reason.value).inc()
    rejection = Rejection.of(error, body, Source.HTTP, device_id=device_id, topic=path)
    try:
        await ctx.publisher.publish_rejection(rejection)
    except PublishFailed as exc:
        log.warning("could not dead-letter a refused request: %s", exc)
