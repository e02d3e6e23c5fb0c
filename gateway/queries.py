"""Reads for operators: device state, history, fleet counts and dead letters.

Every list is keyset-paginated: the cursor is opaque to clients (base64 of the last row's sort
key), so page 1,000 costs what page 1 costs.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, and_, case, func, literal, select, tuple_
from sqlalchemy.sql import ColumnElement

from gateway.messages import DeviceStatus, show_bytes, utcnow
from gateway.payload import MetricValue
from gateway.schema import devices, heartbeats, rejected
from gateway.state import DeviceState

T = TypeVar("T")

MAX_PAGE = 1000


class Page(BaseModel, Generic[T]):
    items: list[T]
    #: Pass as `cursor` to get the next page; null on the last page.
    next_cursor: str | None = None


class LatestHeartbeat(BaseModel):
    id: uuid.UUID
    received_at: datetime
    seq: int | None
    ts: datetime | None
    source: str | None
    metrics: dict[str, MetricValue]


class DeviceView(BaseModel):
    """A device as operators see it: its status now, when it was seen, what it last said."""

    device_id: str
    status: DeviceStatus
    heartbeat_interval_s: int
    first_seen: datetime | None
    last_seen: datetime | None
    metrics: dict[str, MetricValue]
    latest_heartbeat: LatestHeartbeat | None
    reported_status: DeviceStatus | None
    reported_status_at: datetime | None
    enabled: bool
    registered_at: datetime | None

    @classmethod
    def of(cls, state: DeviceState, offline_factor: float, now: datetime) -> DeviceView:
        latest = None
        if state.last_heartbeat_id is not None and state.last_seen is not None:
            latest = LatestHeartbeat(
                id=state.last_heartbeat_id,
                received_at=state.last_seen,
                seq=state.last_seq,
                ts=state.last_device_ts,
                source=state.last_source,
                metrics=state.last_metrics,
            )
        return cls(
            device_id=state.device_id,
            status=state.status(offline_factor, now),
            heartbeat_interval_s=state.heartbeat_interval_s,
            first_seen=state.first_seen,
            last_seen=state.last_seen,
            metrics=state.last_metrics,
            latest_heartbeat=latest,
            reported_status=state.reported_status,
            reported_status_at=state.reported_status_at,
            enabled=state.enabled,
            registered_at=state.registered_at,
        )


class HeartbeatRecord(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    device_id: str
    msg_id: str
    seq: int | None
    ts: datetime | None
    received_at: datetime
    stored_at: datetime
    source: str
    metrics: dict[str, MetricValue]


class RejectedRecord(BaseModel):
    id: uuid.UUID
    received_at: datetime
    stored_at: datetime
    reason: str
    detail: str
    source: str
    device_id: str | None
    topic: str | None
    size: int
    #: The raw payload as text, or `base64:...` when it is not UTF-8.
    payload: str
    replayed_at: datetime | None


class FleetCounts(BaseModel):
    total: int
    online: int
    offline: int
    never_seen: int


class BadCursor(ValueError):
    pass


def encode_cursor(*values: Any) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else str(v) for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _time_id(cursor: str) -> tuple[datetime, uuid.UUID]:
    at, last_id = decode_cursor(cursor, 2)
    try:
        return datetime.fromisoformat(at), uuid.UUID(last_id)
    except ValueError:
        raise BadCursor("cursor is not one this API returned") from None


def decode_cursor(cursor: str, size: int) -> list[str]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise BadCursor("cursor is not one this API returned") from None
    if not isinstance(values, list) or len(values) != size:
        raise BadCursor("cursor is not one this API returned")
    return [str(v) for v in values]


# ---- devices ----------------------------------------------------------------------------------


def _status_expr(offline_factor: float, now: datetime) -> ColumnElement[str]:
    """SQL for `DeviceState.status`, to filter lists by status in the database."""
    deadline = devices.c.last_seen + func.make_interval(
        0, 0, 0, 0, 0, 0, devices.c.heartbeat_interval_s * offline_factor
    )
    reported_offline = and_(
        devices.c.reported_status == DeviceStatus.OFFLINE.value,
        devices.c.reported_status_at >= devices.c.last_seen,
    )
    return case(
        (devices.c.last_seen.is_(None), literal(DeviceStatus.NEVER_SEEN.value)),
        (reported_offline, literal(DeviceStatus.OFFLINE.value)),
        (deadline > now, literal(DeviceStatus.ONLINE.value)),
        else_=literal(DeviceStatus.OFFLINE.value),
    )


def get_device(conn: Connection, device_id: str) -> DeviceState | None:
    row = conn.execute(select(devices).where(devices.c.device_id == device_id)).mappings().first()
    return DeviceState.from_row(row) if row else None


def list_devices(
    conn: Connection,
    *,
    offline_factor: float,
    status: DeviceStatus | None = None,
    limit: int = 100,
    cursor: str | None = None,
    now: datetime | None = None,
) -> Page[DeviceView]:
    now = now or utcnow()
    query = select(devices).order_by(devices.c.device_id).limit(limit + 1)
    if status is not None:
        query = query.where(_status_expr(offline_factor, now) == status.value)
    if cursor:
        (after,) = decode_cursor(cursor, 1)
        query = query.where(devices.c.device_id > after)
    rows = [DeviceState.from_row(r) for r in conn.execute(query).mappings()]
    page = [DeviceView.of(s, offline_factor, now) for s in rows[:limit]]
    more = len(rows) > limit
    return Page(items=page, next_cursor=encode_cursor(page[-1].device_id) if more else None)


def fleet_counts(
    conn: Connection, *, offline_factor: float, now: datetime | None = None
) -> FleetCounts:
    status = _status_expr(offline_factor, now or utcnow()).label("status")
    inner = select(status).subquery()
    rows = conn.execute(select(inner.c.status, func.count()).group_by(inner.c.status)).all()
    counts = {s.value: 0 for s in DeviceStatus} | {row[0]: row[1] for row in rows}
    return FleetCounts(total=sum(counts.values()), **counts)


# ---- history ----------------------------------------------------------------------------------


def list_heartbeats(
    conn: Connection,
    device_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[HeartbeatRecord]:
    """Newest first, by receive time."""
    h = heartbeats.c
    query = (
        select(
            h.id,
            h.device_id,
            h.msg_id,
            h.seq,
            h.device_ts.label("ts"),
            h.received_at,
            h.stored_at,
            h.source,
            h.metrics,
        )
        .where(h.device_id == device_id)
        .order_by(h.received_at.desc(), h.id.desc())
        .limit(limit + 1)
    )
    if since is not None:
        query = query.where(h.received_at >= since)
    if until is not None:
        query = query.where(h.received_at < until)
    if cursor:
        query = query.where(tuple_(h.received_at, h.id) < _time_id(cursor))
    rows = conn.execute(query).mappings().all()
    items = [HeartbeatRecord.model_validate(dict(r)) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(
        items=items,
        next_cursor=encode_cursor(items[-1].received_at, items[-1].id) if more else None,
    )


# ---- dead letters -----------------------------------------------------------------------------


def list_rejected(
    conn: Connection,
    *,
    device_id: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[RejectedRecord]:
    """Newest first."""
    r = rejected.c
    query = select(rejected).order_by(r.received_at.desc(), r.id.desc()).limit(limit + 1)
    if device_id is not None:
        query = query.where(r.device_id == device_id)
    if reason is not None:
        query = query.where(r.reason == reason)
    if since is not None:
        query = query.where(r.received_at >= since)
    if until is not None:
        query = query.where(r.received_at < until)
    if cursor:
        query = query.where(tuple_(r.received_at, r.id) < _time_id(cursor))
    rows = conn.execute(query).mappings().all()
    items = [_rejected_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(
        items=items,
        next_cursor=encode_cursor(items[-1].received_at, items[-1].id) if more else None,
    )


def _rejected_record(row: Any) -> RejectedRecord:
    return RejectedRecord.model_validate({**dict(row), "payload": show_bytes(row["payload"])})
