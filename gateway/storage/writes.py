"""Writes: heartbeats, device state and dead letters, one transaction per batch.

Every write is idempotent. A heartbeat's id is derived from (device_id, msg_id), so a
redelivered message or a retried heartbeat is stored once, whichever day's partition holds it;
device state moves only forward (`GREATEST` of receive times), so replaying a batch changes
nothing.
"""

from __future__ import annotations

import base64
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
    text,
    update,
    values,
)
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.sql.selectable import TableValuedAlias

from gateway.contract.messages import (
    DEDUP_WINDOW_DAYS,
    DeviceStatus,
    Heartbeat,
    Rejection,
    StatusReport,
    to_json,
)
from gateway.storage import liveness, partitions
from gateway.storage.liveness import StatusEvent
from gateway.storage.mirror import DeviceState
from gateway.storage.schema import devices, heartbeats


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
    dedup_window_days: int = DEDUP_WINDOW_DAYS,
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
    `window_days` days before (0: on every day kept; see `gateway.storage.partitions`) are looked up
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


@dataclass
class RejectionsWritten:
    """What became of a batch of dead letters."""

    #: Rows added (redeliveries of rows already stored are skipped).
    kept: int = 0
    #: Dead letters counted but not kept, by source: over their device's hourly cap.
    over_cap: dict[str, int] = field(default_factory=dict)


#: A bucket of the cap: the hour of receipt, in UTC whatever the session's time zone.
_HOUR = "date_bin('1 hour', r.received_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')"

# One statement per batch. Each dead letter not stored yet is counted against its device's
# hour (`rejected_counts`, whose row the upsert locks until commit: exact across workers); those
# within the cap are stored, and the rest are counted in the hour's `over_cap` entry (one per
# device and hour, its id derived from both, its detail rewritten with the running count).
_WRITE_REJECTIONS = text(
    f"""
    WITH batch AS MATERIALIZED (
      SELECT r.id, r.received_at, r.reason, r.detail, r.source, r.device_id, r.topic, r.size,
             decode(r.payload, 'base64') AS payload,
             coalesce(r.device_id, '') AS device_key,
             {_HOUR} AS hour,
             row_number() OVER (
               PARTITION BY coalesce(r.device_id, ''), {_HOUR} ORDER BY r.received_at, r.id
             ) AS n
      FROM json_to_recordset(CAST(:rows AS json)) AS r(
        id uuid, received_at timestamptz, reason text, detail text, source text,
        device_id text, topic text, size integer, payload text)
      WHERE NOT EXISTS (SELECT FROM rejected AS stored WHERE stored.id = r.id)
    ), wanted AS (
      SELECT hour, device_key, count(*) AS added FROM batch GROUP BY hour, device_key
    ), counted AS (
      INSERT INTO rejected_counts AS c (hour, device_key, received)
      SELECT hour, device_key, added FROM wanted ORDER BY hour, device_key
      ON CONFLICT (hour, device_key) DO UPDATE SET received = c.received + excluded.received
      RETURNING c.hour, c.device_key, c.received
    ), placed AS MATERIALIZED (
      SELECT b.*, c.received AS total,
             :cap > 0 AND c.received - w.added + b.n > :cap AS over_cap
      FROM batch AS b
      JOIN wanted AS w USING (hour, device_key)
      JOIN counted AS c USING (hour, device_key)
    ), kept AS (
      INSERT INTO rejected (id, received_at, reason, detail, source, device_id, topic, size,
                            payload)
      SELECT id, received_at, reason, detail, source, device_id, topic, size, payload
      FROM placed WHERE NOT over_cap
      ON CONFLICT (id) DO NOTHING
      RETURNING id
    ), noted AS (
      INSERT INTO rejected AS x (id, received_at, reason, detail, source, device_id, size,
                                 payload)
      SELECT md5('over_cap/' || device_key || '/' || extract(epoch FROM hour)::bigint)::uuid,
             max(received_at), 'over_cap',
             format(
               '%s counted, not kept: over the cap of %s dead letters per device in the hour '
               'from %s', max(total) - :cap, :cap,
               to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24"\\:00Z"')),
             min(source), nullif(device_key, ''), 0, ''::bytea
      FROM placed WHERE over_cap
      GROUP BY hour, device_key
      ON CONFLICT (id) DO UPDATE SET
        detail = excluded.detail,
        received_at = greatest(x.received_at, excluded.received_at),
        stored_at = now()
    )
    SELECT NULL AS source, count(*) AS n FROM kept
    UNION ALL
    SELECT source, count(*) FROM placed WHERE over_cap GROUP BY source
    """
)


def write_rejections(
    conn: Connection, rejections: Sequence[Rejection], *, cap_per_hour: int = 0
) -> RejectionsWritten:
    """Store dead letters, at most `cap_per_hour` per device and hour of receipt (0: no cap;
    those without a device share one allowance); the rest are counted, never silently lost.
    One already stored (a redelivery) is skipped. Runs in the caller's transaction.

    Kept rows are exactly once. A count over the cap is at least once: a batch redelivered
    after a crash between commit and ack is counted again (keeping the ids of what was not
    kept would cost the storage the cap saves)."""
    if not rejections:
        return RejectionsWritten()
    rows = [
        {
            "id": r.id,
            "received_at": r.received_at,
            "reason": r.reason,
            "detail": r.detail,
            "source": r.source,
            "device_id": r.device_id,
            "topic": r.topic,
            "size": r.size,
            "payload": base64.b64encode(r.payload).decode(),
        }
        for r in rejections
    ]
    params = {"rows": orjson.dumps(rows).decode(), "cap": cap_per_hour}
    written = RejectionsWritten()
    for source, count in conn.execute(_WRITE_REJECTIONS, params):
        if source is None:
            written.kept = count
        else:
            written.over_cap[source] = count
    return written


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
