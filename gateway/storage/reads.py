"""Reads for operators: device state, history, fleet counts and dead letters.

Every list is keyset-paginated: the cursor is opaque to clients (base64 of the last row's sort
key), so page 1,000 costs what page 1 costs.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Connection,
    Numeric,
    Text,
    and_,
    case,
    cast,
    func,
    literal,
    select,
    text,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.sql import ColumnElement

from gateway.contract.messages import DeviceStatus, show_bytes, utcnow
from gateway.storage.liveness import StatusEvent
from gateway.storage.mirror import DeviceState
from gateway.storage.partitions import stored_since
from gateway.storage.schema import device_events, devices, heartbeats, rejected
from gateway.storage.views import (
    Aggregate,
    DeviceView,
    Fleet,
    HeartbeatRecord,
    MetricPoint,
    MetricSeries,
    OfflineDevice,
    Page,
    RejectedRecord,
)

MAX_PAGE = 1000
#: Cursors this API issues are far shorter; a longer one is refused before it is decoded.
MAX_CURSOR = 512
MAX_BIGINT = 2**63 - 1
#: The largest magnitude a float holds: aggregates are clamped to it, so each is a finite
#: float or a 64-bit integer (input already bounds every stored number; this makes it total).
FLOAT_MAX = Decimal(repr(sys.float_info.max))


class BadCursor(ValueError):
    pass


def encode_cursor(*values: Any) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else str(v) for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _time_id(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (time, id) a cursor names, the time in UTC: PostgreSQL takes offsets up to 15:59
    only, and this API's cursors never carry another."""
    at, last_id = decode_cursor(cursor, 2)
    try:
        when = datetime.fromisoformat(at)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        return when, uuid.UUID(last_id)
    except (ValueError, OverflowError):
        raise BadCursor("cursor is not one this API returned") from None


def decode_cursor(cursor: str, size: int) -> list[str]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise BadCursor("cursor is not one this API returned") from None
    if not isinstance(values, list) or len(values) != size:
        raise BadCursor("cursor is not one this API returned")
    values = [str(v) for v in values]
    if any("\x00" in v for v in values):  # PostgreSQL text cannot hold NUL: never ours
        raise BadCursor("cursor is not one this API returned")
    return values


# ---- devices ----------------------------------------------------------------------------------


def _status_expr(now: datetime) -> ColumnElement[str]:
    """SQL for `DeviceState.status_at`, to filter lists by status in the database."""
    expired = and_(devices.c.status == DeviceStatus.ONLINE.value, devices.c.offline_deadline <= now)
    return case((expired, literal(DeviceStatus.OFFLINE.value)), else_=devices.c.status)


def get_device(conn: Connection, device_id: str) -> DeviceState | None:
    row = conn.execute(select(devices).where(devices.c.device_id == device_id)).mappings().first()
    return DeviceState.from_row(row) if row else None


def list_devices(
    conn: Connection,
    *,
    status: DeviceStatus | None = None,
    limit: int = 100,
    cursor: str | None = None,
    now: datetime | None = None,
) -> Page[DeviceView]:
    now = now or utcnow()
    query = select(devices).order_by(devices.c.device_id).limit(limit + 1)
    if status is not None:
        query = query.where(_status_expr(now) == status.value)
    if cursor:
        (after,) = decode_cursor(cursor, 1)
        query = query.where(devices.c.device_id > after)
    rows = [DeviceState.from_row(r) for r in conn.execute(query).mappings()]
    page = [DeviceView.of(s, now) for s in rows[:limit]]
    more = len(rows) > limit
    return Page(items=page, next_cursor=encode_cursor(page[-1].device_id) if more else None)


def fleet_counts(conn: Connection, *, now: datetime | None = None, recent: int = 10) -> Fleet:
    """Counts by status and the devices that went offline most recently, in two index-backed
    queries (never a scan of heartbeats)."""
    now = now or utcnow()
    d = devices.c
    total, online_count, never_seen = conn.execute(
        select(
            func.count(),
            func.count().filter(_status_expr(now) == DeviceStatus.ONLINE.value),
            func.count().filter(d.status == DeviceStatus.NEVER_SEEN.value),
        )
    ).one()
    gone = conn.execute(
        select(d.device_id, d.status_changed_at, d.status_reason, d.last_seen)
        .where(d.status == DeviceStatus.OFFLINE.value)
        .order_by(d.status_changed_at.desc().nulls_last())
        .limit(recent)
    ).all()
    return Fleet(
        total=total,
        online=online_count,
        offline=total - online_count - never_seen,
        never_seen=never_seen,
        recently_offline=[
            OfflineDevice(
                device_id=g.device_id,
                since=g.status_changed_at,
                reason=g.status_reason,
                last_seen=g.last_seen,
            )
            for g in gone
        ],
    )


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
    query = select(
        h.id,
        h.device_id,
        h.msg_id,
        h.seq,
        h.device_ts.label("ts"),
        h.received_at,
        h.stored_at,
        h.source,
        h.metrics,
    ).where(
        h.device_id == device_id,
        *received_between(h.received_at, since, until),
        *stored_since(since),
    )
    return _newest_first(
        conn,
        query,
        h.received_at,
        h.id,
        limit=limit,
        cursor=cursor,
        item=lambda row: HeartbeatRecord.model_validate(dict(row)),
    )


def received_between(column: Any, since: datetime | None, until: datetime | None) -> list:
    """`since <= column < until`, either end open."""
    return [
        *([column >= since] if since is not None else []),
        *([column < until] if until is not None else []),
    ]


def _newest_first(
    conn: Connection,
    query: Any,
    at: Any,
    key: Any,
    *,
    limit: int,
    cursor: str | None,
    item: Any,
) -> Page:
    """A keyset page of `query`, newest first by (`at`, `key`): the same cost on any page."""
    query = query.order_by(at.desc(), key.desc()).limit(limit + 1)
    if cursor:
        query = query.where(tuple_(at, key) < _time_id(cursor))
    rows = conn.execute(query).mappings().all()
    items = [item(row) for row in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return Page(
        items=items, next_cursor=encode_cursor(last[at.key], last[key.key]) if last else None
    )


def list_events(
    conn: Connection, device_id: str, *, limit: int = 100, cursor: str | None = None
) -> Page[StatusEvent]:
    """A device's status changes, newest first."""
    e = device_events.c
    query = select(device_events).where(e.device_id == device_id).order_by(e.id.desc())
    if cursor:
        (before,) = decode_cursor(cursor, 1)
        # ASCII digits only ("²" is a digit to Python, not to int()), and within bigint.
        if not (before.isascii() and before.isdigit() and int(before) <= MAX_BIGINT):
            raise BadCursor("cursor is not one this API returned")
        query = query.where(e.id < int(before))
    rows = conn.execute(query.limit(limit + 1)).mappings().all()
    items = [StatusEvent.model_validate(dict(r)) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)


#: Bucket widths `GET /devices/{id}/metrics` accepts: a number and a unit (s, m, h, d).
BUCKET_RE = re.compile(r"^([1-9][0-9]{0,4})([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_BUCKETS = 10_000
BUCKET_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


def bucket_seconds(bucket: str) -> int:
    match = BUCKET_RE.fullmatch(bucket)
    if match is None:
        raise ValueError(f"bucket {bucket[:20]!r} is not a number and a unit, e.g. 30s, 1m, 1h, 1d")
    return int(match.group(1)) * UNIT_SECONDS[match.group(2)]


def metric_series(
    conn: Connection,
    device_id: str,
    names: list[str],
    *,
    since: datetime,
    until: datetime,
    bucket: str,
    agg: Aggregate,
) -> MetricSeries:
    """One query for every name: avg/min/max over numeric values, count of values, or the
    last value (any type) of each bucket.

    Numbers are aggregated as PostgreSQL `numeric`, exactly: a float8 sum overflows past
    1.8e308 and rounds 64-bit integers. `min` and `max` come back as the value stored (an
    integer stays one); `avg` as the nearest float (within +-1.7976931348623157e308)."""
    width = bucket_seconds(bucket)
    if (until - since).total_seconds() / width > MAX_BUCKETS:
        raise ValueError(f"more than {MAX_BUCKETS} buckets: widen the bucket or narrow the window")
    h = heartbeats.c
    name = func.unnest(literal(names, ARRAY(Text))).table_valued("name").render_derived()
    value = h.metrics[name.c.name]
    number = case((func.jsonb_typeof(value) == "number", cast(value, Numeric)))
    start = func.date_bin(func.make_interval(0, 0, 0, 0, 0, 0, width), h.received_at, BUCKET_ORIGIN)
    largest = literal(FLOAT_MAX, Numeric)

    def as_json(exact: ColumnElement) -> ColumnElement:
        # As JSON, parsed by the client library: a cast to float8 would fail where an average
        # is too small for a float (it becomes 0.0 here), and would round 64-bit integers.
        return func.to_jsonb(func.least(func.greatest(exact, -largest), largest))

    aggregate = {
        "avg": as_json(func.avg(number)),
        "min": as_json(func.min(number)),
        "max": as_json(func.max(number)),
        "count": func.count(value),
        "last": func.array_agg(aggregate_order_by(value, h.received_at.desc()))[1],
    }[agg]
    rows = conn.execute(
        select(name.c.name, start.label("t"), aggregate.label("value"))
        .select_from(heartbeats)
        .join(name, true())
        .where(
            h.device_id == device_id,
            *received_between(h.received_at, since, until),
            *stored_since(since),
            h.metrics.has_key(name.c.name),
        )
        .group_by(name.c.name, text("t"))
        .order_by(name.c.name, text("t"))
    ).all()
    series: dict[str, list[MetricPoint]] = {n: [] for n in names}
    for metric, t, v in rows:
        series[metric].append(MetricPoint(t=t, value=v))
    return MetricSeries(
        device_id=device_id, bucket=bucket, agg=agg, since=since, until=until, series=series
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
    query = select(rejected).where(*rejected_conditions(device_id, reason, since, until))
    r = rejected.c
    return _newest_first(
        conn, query, r.received_at, r.id, limit=limit, cursor=cursor, item=_rejected_record
    )


def rejected_conditions(
    device_id: str | None, reason: str | None, since: datetime | None, until: datetime | None
) -> list:
    """Dead-letter filters, shared by the API and `gateway rejected`."""
    r = rejected.c
    return [
        *([r.device_id == device_id] if device_id is not None else []),
        *([r.reason == reason] if reason is not None else []),
        *received_between(r.received_at, since, until),
    ]


def _rejected_record(row: Any) -> RejectedRecord:
    return RejectedRecord.model_validate({**dict(row), "payload": show_bytes(row["payload"])})
