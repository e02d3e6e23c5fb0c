"""Writes: heartbeats, device state and dead letters, one transaction per batch.

Every write is idempotent. A heartbeat's id is derived from (device_id, msg_id), so a
redelivered message or a retried heartbeat is stored once, whichever day's partition holds it;
device state moves only forward (`GREATEST` of receive times), so replaying a batch changes
nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta

import orjson
from sqlalchemy import (
    JSON,
    Connection,
    Date,
    DateTime,
    Float,
    Table,
    Text,
    bindparam,
    case,
    cast,
    column,
    func,
    select,
    update,
    values,
)
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.sql.selectable import TableValuedAlias

from gateway import liveness, partitions
from gateway.liveness import StatusEvent
from gateway.messages import DeviceStatus, Heartbeat, Rejection, StatusReport, to_json
from gateway.schema import devices, heartbeats, rejected
from gateway.state import DeviceState


@dataclass
class BatchResult:
    inserted: int = 0
    duplicates: int = 0
    states: list[DeviceState] = field(default_factory=list)
    events: list[StatusEvent] = field(default_factory=list)
    #: Messages of devices disabled when the batch was written: not stored (dead letters).
    disabled: list[Heartbeat | StatusReport] = field(default_factory=list)

    def add(self, other: BatchResult) -> None:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.states += other.states
        self.events += other.events
        self.disabled += other.disabled


def write_batch(
    conn: Connection,
    beats: Sequence[Heartbeat],
    statuses: Sequence[StatusReport] = (),
    *,
    default_interval_s: int = 30,
    offline_factor: float = 3.0,
    dedup_window_days: int = partitions.DEDUP_WINDOW_DAYS,
) -> BatchResult:
    """Insert heartbeats (skipping ones already stored), move device state forward, and record
    every change of status as an event. Messages of disabled devices are left out and returned
    in `disabled`: the devices' rows are locked first, so a device is either disabled before
    the batch (and none of its messages stored) or after it commits.

    Runs inside the caller's transaction; nothing is visible (or announced) until it commits.
    """
    result = BatchResult()
    locked = liveness.lock_statuses(conn, [m.device_id for m in (*beats, *statuses)])
    if locked.disabled:
        result.disabled = [m for m in (*beats, *statuses) if m.device_id in locked.disabled]
        beats = [b for b in beats if b.device_id not in locked.disabled]
        statuses = [s for s in statuses if s.device_id not in locked.disabled]
    if beats:
        result.inserted = _insert_heartbeats(conn, beats, dedup_window_days)
        result.duplicates = len(beats) - result.inserted
    status = dict(locked.status)
    states: dict[str, DeviceState] = {}

    def changed(new_states: list[DeviceState]) -> None:
        # Each step's changes are events of their own: a heartbeat and a Last Will in the same
        # batch are two events (online, then offline), not one.
        result.events += liveness.record_changes(conn, status, new_states)
        for state in new_states:
            status[state.device_id] = state.status
            states[state.device_id] = state

    liveness_args = {"default_interval_s": default_interval_s, "offline_factor": offline_factor}
    if beats:
        changed(_upsert_seen(conn, beats, **liveness_args))
    online = [s for s in statuses if s.status == DeviceStatus.ONLINE]
    if online:
        changed(_upsert_seen(conn, online, **liveness_args))
    offline = [s for s in statuses if s.status == DeviceStatus.OFFLINE]
    if offline:
        changed(_apply_offline(conn, offline))
    result.states = list(states.values())
    return result


def _insert_heartbeats(conn: Connection, beats: Sequence[Heartbeat], window_days: int) -> int:
    """Store the heartbeats not stored yet, under today's partition; returns how many.

    Copies stored today meet the primary key `(id, stored_on)`; copies stored on the
    `window_days` days before (0: on every day kept; see `gateway.partitions`) are looked up
    by the same statement, so a batch costs one round trip however many it holds."""
    day = partitions.claim_day(conn)
    partitions.ensure(conn, day)
    params = {
        "day": day,
        "since": day - timedelta(days=window_days) if window_days else date.min,
        "rows": to_json(list(beats)).decode(),
    }
    return conn.execute(_insert_statement(), params).rowcount


#: The heartbeat fields stored as columns of the same name.
_HEARTBEAT_COLUMNS = (
    "id",
    "device_id",
    "msg_id",
    "seq",
    "device_ts",
    "received_at",
    "source",
    "metrics",
)


def _json_rows(table: Table, names: Sequence[str]) -> TableValuedAlias:
    """The rows of a batch, sent as one JSON parameter (`rows`) that PostgreSQL unpacks, typed
    like `table`'s columns `names` (other fields are ignored): far less work in the worker than
    binding each value of each row."""
    return (
        func.json_to_recordset(cast(bindparam("rows", type_=Text), JSON))
        .table_valued(*(column(name, table.c[name].type) for name in names))
        .render_derived(name="r", with_types=True)
    )


@functools.cache
def _insert_statement() -> Insert:
    """Built once: the rows from `_json_rows` not stored on an earlier day since `since`, all
    under the partition of `day`."""
    h = heartbeats.c
    rows = _json_rows(heartbeats, _HEARTBEAT_COLUMNS)
    day = cast(bindparam("day"), Date)
    earlier = heartbeats.alias("earlier")
    stored_before = (
        select(earlier.c.id)
        .where(
            earlier.c.id == rows.c.id,
            earlier.c.stored_on < day,
            earlier.c.stored_on >= cast(bindparam("since"), Date),
        )
        .exists()
    )
    return (
        insert(heartbeats)
        .from_select(
            ["stored_on", *_HEARTBEAT_COLUMNS],
            select(day, *(rows.c[name] for name in _HEARTBEAT_COLUMNS)).where(~stored_before),
        )
        .on_conflict_do_nothing(index_elements=[h.id, h.stored_on])
    )


def _latest(messages: Sequence[Heartbeat | StatusReport]) -> dict[str, Heartbeat | StatusReport]:
    latest: dict[str, Heartbeat | StatusReport] = {}
    for m in messages:
        if m.device_id not in latest or m.received_at > latest[m.device_id].received_at:
            latest[m.device_id] = m
    return latest


def _upsert_seen(
    conn: Connection,
    seen: Sequence[Heartbeat | StatusReport],
    *,
    default_interval_s: int,
    offline_factor: float,
) -> list[DeviceState]:
    """The device was heard from: by a heartbeat, or by its own `online` status message."""
    first = {}
    for m in seen:
        if m.device_id not in first or m.received_at < first[m.device_id]:
            first[m.device_id] = m.received_at
    heard = isinstance(seen[0], Heartbeat)
    reason = "heartbeat" if heard else "status_message"
    rows = []
    for device_id, m in _latest(seen).items():
        row = {
            "device_id": device_id,
            "heartbeat_interval_s": default_interval_s,
            "first_seen": first[device_id],
            "last_seen": m.received_at,
            "status": DeviceStatus.ONLINE.value,
            "status_changed_at": m.received_at,
            "status_reason": reason,
            "offline_deadline": m.received_at
            + timedelta(seconds=default_interval_s * offline_factor),
        }
        if heard:
            row |= {
                "last_heartbeat_id": m.id,
                "last_seq": m.seq,
                "last_device_ts": m.device_ts,
                "last_metrics": m.metrics,
                "last_source": m.source.value,
            }
        rows.append(row)
    stmt = _upsert_statement(heard)
    params = {"rows": orjson.dumps(rows).decode(), "offline_factor": offline_factor}
    return [DeviceState.from_row(r) for r in conn.execute(stmt, params).mappings()]


#: The columns an upsert sets from what was heard; a heartbeat also sets `_LAST_COLUMNS`.
_SEEN_COLUMNS = (
    "device_id",
    "heartbeat_interval_s",
    "first_seen",
    "last_seen",
    "status",
    "status_changed_at",
    "status_reason",
    "offline_deadline",
)
_LAST_COLUMNS = ("last_heartbeat_id", "last_seq", "last_device_ts", "last_metrics", "last_source")


@functools.cache
def _upsert_statement(heard: bool) -> Insert:
    """Built once per kind. The rows come from `_json_rows`, in device order, so concurrent
    workers lock device rows in the same order."""
    d = devices.c
    names = _SEEN_COLUMNS + (_LAST_COLUMNS if heard else ())
    rows = _json_rows(devices, names)
    stmt = insert(devices).from_select(
        names, select(*(rows.c[name] for name in names)).order_by(rows.c.device_id)
    )
    new = stmt.excluded
    newer = d.last_seen.is_(None) | (new.last_seen > d.last_seen)
    # Heard from after its last change of status (a late message changes nothing).
    revives = d.status_changed_at.is_(None) | (new.last_seen > d.status_changed_at)
    turns_online = revives & (d.status != DeviceStatus.ONLINE.value)
    offline_factor = bindparam("offline_factor", type_=Float)
    deadline = func.greatest(d.last_seen, new.last_seen) + func.make_interval(
        0, 0, 0, 0, 0, 0, d.heartbeat_interval_s * offline_factor
    )
    set_ = {
        "first_seen": func.least(d.first_seen, new.first_seen),
        "last_seen": func.greatest(d.last_seen, new.last_seen),
        "status": case((revives, new.status), else_=d.status),
        "status_changed_at": case((turns_online, new.last_seen), else_=d.status_changed_at),
        "status_reason": case((turns_online, new.status_reason), else_=d.status_reason),
        "offline_deadline": case((revives, deadline), else_=d.offline_deadline),
        "version": d.version + 1,
    }
    if heard:
        set_ |= {name: case((newer, new[name]), else_=d[name]) for name in _LAST_COLUMNS}
    return stmt.on_conflict_do_update(index_elements=[d.device_id], set_=set_).returning(*d)


def _apply_offline(conn: Connection, reports: Sequence[StatusReport]) -> list[DeviceState]:
    """The device said `offline` (its Last Will): offline at once, unless heard from since.
    One statement for every device of the batch (a broker restart fires them all at once)."""
    d = devices.c
    said = values(
        column("device_id", Text), column("at", DateTime(timezone=True)), name="said"
    ).data([(device_id, r.received_at) for device_id, r in sorted(_latest(reports).items())])
    stmt = (
        update(devices)
        .where(
            d.device_id == said.c.device_id,
            d.last_seen.is_(None) | (d.last_seen <= said.c.at),
            d.status_changed_at.is_(None) | (d.status_changed_at < said.c.at),
        )
        .values(
            status=DeviceStatus.OFFLINE.value,
            status_changed_at=said.c.at,
            status_reason="last_will",
            offline_deadline=None,
            version=d.version + 1,
        )
        .returning(*d)
    )
    return [DeviceState.from_row(row) for row in conn.execute(stmt).mappings()]


def write_rejections(conn: Connection, rejections: Sequence[Rejection]) -> int:
    """Store dead letters; one already stored (a redelivery) is skipped. Returns rows added."""
    if not rejections:
        return 0
    stmt = (
        insert(rejected)
        .on_conflict_do_nothing(index_elements=[rejected.c.id])
        .returning(rejected.c.id)
    )
    rows = [
        {
            "id": r.id,
            "received_at": r.received_at,
            "reason": r.reason.value,
            "detail": r.detail,
            "source": r.source.value,
            "device_id": r.device_id,
            "topic": r.topic,
            "size": r.size,
            "payload": r.payload,
        }
        for r in rejections
    ]
    return len(conn.execute(stmt, rows).all())


def iter_states(conn: Connection, page_size: int = 5000) -> Iterator[list[DeviceState]]:
    """Every device's state, in pages by device id (keyset, so each page costs the same)."""
    after = ""
    while True:
        rows = (
            conn.execute(
                select(devices)
                .where(devices.c.device_id > after)
                .order_by(devices.c.device_id)
                .limit(page_size)
            )
            .mappings()
            .all()
        )
        if not rows:
            return
        yield [DeviceState.from_row(r) for r in rows]
        after = rows[-1]["device_id"]
