"""Commands over HTTP: operators send, list, read and cancel them; HTTP devices receive them
(in a heartbeat's answer, or by long-polling) and reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel

from api.auth import Operator
from api.command_hub import hand_over
from api.context import Context, DevicePath, context
from api.ingest import authenticate_device, device_bearer, read_body, refuse, unconfirmed
from api.responses import errors
from gateway.amqp.publisher import PublishFailed
from gateway.contract.commands import (
    Command,
    CommandMessage,
    CommandRequest,
    CommandStatus,
    parse_reply,
)
from gateway.contract.messages import Source, utcnow
from gateway.contract.payload import MAX_PAYLOAD_BYTES, decode_json
from gateway.contract.reasons import InputError, Reason, unforeseen
from gateway.storage import command_store
from gateway.storage.reads import MAX_CURSOR, MAX_PAGE
from gateway.storage.views import Page

log = logging.getLogger(__name__)
Ctx = Annotated[Context, Depends(context)]
#: The longest long-poll.
MAX_WAIT_S = 60


# ---- operators ------------------------------------------------------------------------------

operators = APIRouter(
    prefix="/api/v1", tags=["commands"], dependencies=[Operator], responses=errors(401, 422, 503)
)


@operators.post(
    "/devices/{device_id}/commands",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a device a command",
    responses=errors(400, 404),
)
def send_command(device_id: DevicePath, request: CommandRequest, ctx: Ctx) -> Command:
    """Stored `pending` before this answers; delivered over MQTT (QoS 1, the broker's own
    expiry at `expires_at`) and in the device's next HTTP answers, until it replies, the
    command expires or it is cancelled."""
    try:
        with ctx.engine.begin() as conn:
            command = command_store.create(conn, device_id, request)
    except command_store.UnknownDevice:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}") from None
    if ctx.commands.dispatcher is not None:
        anyio.from_thread.run_sync(ctx.commands.dispatcher.wake)
    log.info("command %s (%s) for %s", command.id, command.name, device_id)
    return command


@operators.get(
    "/devices/{device_id}/commands",
    summary="A device's commands, newest first",
    responses=errors(400),
)
def list_commands(
    device_id: DevicePath,
    ctx: Ctx,
    status_: Annotated[CommandStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=MAX_CURSOR)] = None,
) -> Page[Command]:
    with ctx.reads.connect() as conn:
        return command_store.list_for_device(
            conn, device_id, status=status_, limit=limit, cursor=cursor
        )


def _found(command: Command | None, command_id: uuid.UUID) -> Command:
    if command is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command {command_id}")
    return command


@operators.get("/commands/{command_id}", summary="One command", responses=errors(404))
def get_command(command_id: uuid.UUID, ctx: Ctx) -> Command:
    with ctx.reads.connect() as conn:
        return _found(command_store.get(conn, command_id), command_id)


@operators.delete(
    "/commands/{command_id}",
    summary="Cancel a command not yet delivered",
    responses={**errors(404), 409: {"description": "The command is no longer pending"}},
)
def cancel_command(command_id: uuid.UUID, ctx: Ctx) -> Command:
    with ctx.engine.begin() as conn:
        cancelled = command_store.cancel(conn, command_id)
        if cancelled is not None:
            return cancelled
        command = _found(command_store.get(conn, command_id), command_id)
    why = "being sent" if command.status == CommandStatus.PENDING else command.status
    raise HTTPException(
        status.HTTP_409_CONFLICT,
        f"command {command_id} is {why}: only a pending command can be cancelled",
    )


# ---- devices --------------------------------------------------------------------------------

devices = APIRouter(prefix="/api/v1", tags=["devices"])


class Handed(BaseModel):
    #: The device's live commands, the oldest first (a repeat has the same id).
    commands: list[CommandMessage]


class ReplyAccepted(BaseModel):
    id: uuid.UUID


async def _device(
    device_id: DevicePath,
    ctx: Ctx,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(device_bearer)],
) -> str:
    await authenticate_device(ctx, device_id, credentials)
    return device_id


@devices.get(
    "/devices/{device_id}/commands/next",
    summary="Long-poll for a device's commands",
    responses=errors(401, 403, 422, 503),
)
async def next_commands(
    device_id: Annotated[str, Depends(_device)],
    ctx: Ctx,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait")] = 0,
) -> Handed:
    """Answers as soon as the device has a live command, or with none after `wait` s."""
    deadline = asyncio.get_running_loop().time() + wait
    with ctx.commands.waiting(device_id) as changed:
        while True:
            changed.clear()
            handed = await hand_over(ctx, device_id)
            left = deadline - asyncio.get_running_loop().time()
            if handed or left <= 0:
                return Handed(commands=handed)
            # Woken by NOTIFY; asked again every few seconds in case a notice was missed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, 5.0))


@devices.post(
    "/devices/{device_id}/commands/{command_id}/reply",
    status_code=status.HTTP_202_ACCEPTED,
    summary="A device's reply to a command",
    responses=errors(401, 403, 413, 415, 422, 503),
)
async def reply(
    command_id: uuid.UUID,
    device_id: Annotated[str, Depends(_device)],
    request: Request,
    ctx: Ctx,
) -> ReplyAccepted:
    """`{"status": "succeeded" | "failed", "result": {...}}` (`id` may be left out). 202 once
    the broker holds it; stored once however often it arrives. A reply to an unknown command,
    another device's, a cancelled or an expired one becomes a dead letter with that reason."""
    received_at = utcnow()
    raw = b""
    path = request.url.path
    try:
        raw = await read_body(request.headers, request.stream())
        body = _with_id(raw, command_id)
        converted = parse_reply(device_id, body, Source.HTTP, received_at)
    except InputError as error:
        raise await refuse(ctx, error, raw, device_id, path) from None
    try:
        await ctx.publisher.publish_reply(converted)
    except PublishFailed as exc:
        raise unconfirmed(device_id, "reply", exc, "retry later (it is stored once)") from None
    return ReplyAccepted(id=command_id)


def _with_id(raw: bytes, command_id: uuid.UUID) -> bytes:
    """The body with the path's command id (a body naming another is refused). Raises
    `InputError` and nothing else."""
    try:
        return _body_with_id(raw, command_id)
    except InputError:
        raise
    except Exception as exc:
        raise unforeseen(exc, "a command reply over http") from exc


def _body_with_id(raw: bytes, command_id: uuid.UUID) -> bytes:
    if len(raw) > MAX_PAYLOAD_BYTES:
        return raw  # parse_reply says so
    document = decode_json(raw) if raw.strip() else {}
    if not isinstance(document, dict):
        return raw
    given = document.setdefault("id", str(command_id))
    if given != str(command_id):
        raise InputError(
            Reason.INVALID_FIELD, f"id: {str(given)[:80]!r} is not the path's command id"
        )
    return json.dumps(document).encode()
