"""Operator endpoints: device state, history, fleet counts, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar

import anyio.from_thread
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints
from sqlalchemy import Connection

from api.auth import Operator
from api.context import Context, DevicePath, Since, Until, context
from api.responses import errors
from api.stream import OVERFLOW
from gateway.amqp import sessions
from gateway.contract.commands import set_heartbeat_interval
from gateway.contract.credentials import token_hash
from gateway.contract.messages import DeviceStatus, utcnow
from gateway.contract.payload import METRIC_NAME_PATTERN
from gateway.contract.reasons import Reason
from gateway.storage import command_store, mirror, quality, reads, registry, views
from gateway.storage.liveness import StatusEvent
from gateway.storage.reads import MAX_CURSOR, MAX_PAGE
from gateway.storage.views import DeviceView, Fleet, HeartbeatRecord, Page, RejectedRecord

log = logging.getLogger(__name__)
R = TypeVar("R")
router = APIRouter(
    prefix="/api/v1",
    tags=["operators"],
    dependencies=[Operator],
    responses=errors(401, 422, 503),
)

Ctx = Annotated[Context, Depends(context)]
KEEPALIVE_S = 15.0
DEFAULT_WINDOW = timedelta(hours=24)
EARLIEST = datetime.min.replace(tzinfo=UTC)
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")]
Cursor = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR, description="next_cursor from the previous page"),
]


@router.get("/devices", summary="List devices (optionally by status)", responses=errors(400))
def list_devices(
    ctx: Ctx,
    status_: Annotated[DeviceStatus | None, Query(alias="status")] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[DeviceView]:
    with ctx.reads.connect() as conn:
        return reads.list_devices(conn, status=status_, limit=limit, cursor=cursor)


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    summary="Register a device; answers its token, this once",
    responses=errors(400, 409),
)
def register_device(registration: registry.Registration, ctx: Ctx) -> registry.IssuedToken:
    with _registry_errors(), ctx.engine.begin() as conn:
        issued, device = registry.register(conn, registration)
    _tokens_changed(ctx, issued.device_id, issued.token)
    _mirror(ctx, device)
    log.info("registered device %s", issued.device_id)
    return issued


@router.post(
    "/devices/{device_id}/token",
    summary="Rotate a device's token: the old one stops working at once",
    responses=errors(404),
)
def rotate_token(device_id: DevicePath, ctx: Ctx) -> registry.IssuedToken:
    with _registry_errors(), ctx.engine.begin() as conn:
        issued, device = registry.rotate(conn, device_id)
    _tokens_changed(ctx, device_id, issued.token)
    sessions.close_sessions(ctx.settings.broker_management_url, device_id)
    _mirror(ctx, device)
    log.info("rotated the token of device %s", device_id)
    return issued


@router.patch(
    "/devices/{device_id}",
    summary="Change a device's interval, or enable/disable it",
    responses=errors(400, 404),
)
def change_device(device_id: DevicePath, changes: registry.DeviceChanges, ctx: Ctx) -> DeviceView:
    with _registry_errors(), ctx.engine.begin() as conn:
        device = registry.change(
            conn, device_id, changes, offline_factor=ctx.settings.offline_factor
        )
        if changes.heartbeat_interval_s is not None:  # the device is told, in the same commit
            command_store.create(conn, device_id, set_heartbeat_interval(device))
    _tokens_changed(ctx, device_id)
    if changes.enabled is False:
        sessions.close_sessions(ctx.settings.broker_management_url, device_id)
    _mirror(ctx, device)
    return DeviceView.of(device, utcnow())


@contextlib.contextmanager
def _registry_errors() -> Iterator[None]:
    try:
        yield
    except registry.UnknownDevice as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except registry.DeviceExists as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except registry.RegistryError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def _tokens_changed(ctx: Context, device_id: str, token: str | None = None) -> None:
    """This process's token cache learns of the change (and of the device's new token) before
    the answer goes out; the others hear of it by NOTIFY a moment later."""
    digest = token_hash(token) if token is not None else None
    anyio.from_thread.run_sync(ctx.tokens.changed, device_id, digest)


def _mirror(ctx: Context, device: mirror.DeviceState) -> None:
    """Registry changes reach the Redis read path at once (best effort: when Redis is down,
    the worker rebuilds the mirror from PostgreSQL once it is back)."""
    ctx.redis_breaker.call(
        lambda: mirror.mirror(ctx.redis, [device]),
        service="api",
        skipped=f"device {device.device_id} not mirrored",
    )


@router.get(
    "/devices/{device_id}",
    summary="One device: status, last seen, latest heartbeat",
    responses=errors(404),
)
def get_device(device_id: DevicePath, ctx: Ctx) -> DeviceView:
    """State from Redis (PostgreSQL when Redis is down), link quality over the last hour."""
    now = utcnow()
    device = _cached_state(ctx, device_id)
    with ctx.reads.connect() as conn:
        if device is None:
            device = reads.get_device(conn, device_id)
        if device is None:
            raise _no_device(device_id)
        link = quality.link_quality(conn, device_id, now) if device.last_seen else None
    return DeviceView.of(device, now, link)


def _no_device(device_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")


def _require_device(conn: Connection, device_id: str, empty: R) -> R:
    """An empty answer, or 404 when the device is unknown (asked only when the answer came back
    empty: a device with data exists)."""
    if reads.get_device(conn, device_id) is None:
        raise _no_device(device_id)
    return empty


def _cached_state(ctx: Context, device_id: str) -> mirror.DeviceState | None:
    """Redis first; PostgreSQL answers (slower) when Redis is down or has no copy."""
    return ctx.redis_breaker.call(
        lambda: mirror.read(ctx.redis, device_id), service="api", skipped="reading from PostgreSQL"
    )


@router.get(
    "/devices/{device_id}/heartbeats",
    summary="A device's stored heartbeats, newest first",
    responses=errors(400, 404),
)
def list_heartbeats(
    device_id: DevicePath,
    ctx: Ctx,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[HeartbeatRecord]:
    with ctx.reads.connect() as conn:
        page = reads.list_heartbeats(
            conn, device_id, since=since, until=until, limit=limit, cursor=cursor
        )
        return page if page.items else _require_device(conn, device_id, page)


@router.get(
    "/devices/{device_id}/metrics",
    summary="A device's metrics in time buckets (avg, min, max, count or last)",
    responses=errors(404),
)
def device_metrics(
    device_id: DevicePath,
    ctx: Ctx,
    name: Annotated[
        list[Annotated[str, StringConstraints(pattern=METRIC_NAME_PATTERN)]],
        Query(min_length=1, max_length=20, description="metric names; repeat for several"),
    ],
    since: Since = None,
    until: Until = None,
    bucket: Annotated[
        str,
        Query(
            pattern=r"^[1-9][0-9]{0,4}[smhd]$",
            description="bucket width: 1 to 99999 seconds, minutes, hours or days (s, m, h, d); "
            f"at most {reads.MAX_BUCKETS} buckets in the window",
        ),
    ] = "1m",
    agg: views.Aggregate = "avg",
) -> views.MetricSeries:
    """Buckets start at multiples of the width (from 2000-01-01T00:00Z); a bucket without a
    value of that metric is absent. Default window: the 24 hours before `until` (now).
    `avg`, `min` and `max` are computed exactly (PostgreSQL numeric) over the numbers
    stored, whatever their size; an average is a finite number."""
    until = until or utcnow()
    if since is None:  # 24 hours earlier, or as early as a time can be
        since = until - min(DEFAULT_WINDOW, until - EARLIEST)
    if since >= until:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "since must be before until")
    with ctx.reads.connect() as conn:
        try:
            series = reads.metric_series(
                conn,
                device_id,
                list(dict.fromkeys(name)),
                since=since,
                until=until,
                bucket=bucket,
                agg=agg,
            )
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        return series if any(series.series.values()) else _require_device(conn, device_id, series)


@router.get("/fleet", summary="Counts by status, and the devices that went offline last")
def fleet(
    ctx: Ctx,
    recent: Annotated[
        int, Query(ge=0, le=100, description="how many recently offline devices to list")
    ] = 10,
) -> Fleet:
    with ctx.reads.connect() as conn:
        return reads.fleet_counts(conn, recent=recent)


@router.get(
    "/devices/{device_id}/events",
    summary="A device's status changes (and why), newest first",
    responses=errors(400, 404),
)
def list_events(
    device_id: DevicePath, ctx: Ctx, limit: Limit = 100, cursor: Cursor = None
) -> Page[StatusEvent]:
    with ctx.reads.connect() as conn:
        page = reads.list_events(conn, device_id, limit=limit, cursor=cursor)
        return page if page.items else _require_device(conn, device_id, page)


@router.get(
    "/events/stream",
    summary="Status changes as they happen (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_events(
    request: Request,
    ctx: Ctx,
    commands: Annotated[
        bool, Query(description="also `event: command` for every command status change")
    ] = False,
) -> StreamingResponse:
    """`event: status` with the change as JSON (`device_id`, `from_status`, `to_status`, `at`,
    `reason`) for every change, a comment every 15 s to keep the connection open, and
    `event: overflow` before closing a client that fell more than 1,000 changes behind. With
    `commands=true`, also `event: command` (`id`, `device_id`, `name`, `status`, `at`)."""
    queue = ctx.stream.subscribe(commands=commands)

    async def events() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n: connected\n\n"
            while not await request.is_disconnected():
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is None:  # the api is stopping
                    return
                yield item
                if item is OVERFLOW:
                    return
        finally:
            ctx.stream.unsubscribe(queue)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/rejected",
    summary="Dead letters: refused input with the reason, newest first",
    responses=errors(400),
)
def list_rejected(
    ctx: Ctx,
    device_id: Annotated[
        str | None,
        Query(
            max_length=200,
            pattern=r"^[^\x00]*$",
            description="as the dead letter names it (which may not be a valid device id)",
        ),
    ] = None,
    reason: Reason | None = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[RejectedRecord]:
    with ctx.reads.connect() as conn:
        return reads.list_rejected(
            conn,
            device_id=device_id,
            reason=reason,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
