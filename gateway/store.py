"""Writes: heartbeats, device state and dead letters, one transaction per batch.

Every write is idempotent. A heartbeat's primary key is derived from (device_id, msg_id), so a
redelivered message or a retried heartbeat is stored once; device state moves only forward
(`GREATEST` of receive times), so replaying a batch changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, case, func, select
from sqlalchemy.dialects.postgresql import insert

from gateway.messages import Heartbeat, Rejection, StatusReport
from gateway.schema import devices, heartbeats, rejected
from gateway.state import DeviceState


@dataclass
class BatchResult:
    inserted: int = 0
    duplicates: int = 0
    states: list[DeviceState] = field(default_factory=list)


def write_batch(
    conn: Connection,
    beats: Sequence[Heartbeat],
    statuses: Sequence[StatusReport] = (),
    *,
    default_interval_s: int = 30,
) -> BatchResult:
    """Insert heartbeats (skipping ones already stored) and move device state forward.

    Runs inside the caller's transaction; nothing is visible until it commits.
    """
    result = BatchResult()
    if beats:
        stmt = (
            insert(heartbeats)
            .on_conflict_do_nothing(index_elements=[heartbeats.c.id])
            .returning(heartbeats.c.id)
        )
        rows = [
            {
                "id": b.id,
                "device_id": b.device_id,
                "msg_id": b.msg_id,
                "seq": b.seq,
                "device_ts": b.device_ts,
                "received_at": b.received_at,
                "source": b.source.value,
                "metrics": b.metrics,
            }
            for b in beats
        ]
        result.inserted = len(conn.execute(stmt, rows).all())
        result.duplicates = len(beats) - result.inserted
    states = {}
    if beats:
        for state in _upsert_seen(conn, beats, default_interval_s):
            states[state.device_id] = state
    if statuses:
        for state in _apply_statuses(conn, statuses, default_interval_s):
            states[state.device_id] = state
    result.states = list(states.values())
    return result


def _upsert_seen(
    conn: Connection, beats: Sequence[Heartbeat], default_interval_s: int
) -> list[DeviceState]:
    latest: dict[str, Heartbeat] = {}
    first: dict[str, Heartbeat] = {}
    for b in beats:
        if b.device_id not in latest or b.received_at > latest[b.device_id].received_at:
            latest[b.device_id] = b
        if b.device_id not in first or b.received_at < first[b.device_id].received_at:
            first[b.device_id] = b
    # Sorted, so concurrent workers lock device rows in the same order (no deadlocks).
    rows = [
        {
            "device_id": device_id,
            "heartbeat_interval_s": default_interval_s,
            "first_seen": first[device_id].received_at,
            "last_seen": b.received_at,
            "last_heartbeat_id": b.id,
            "last_seq": b.seq,
            "last_device_ts": b.device_ts,
            "last_metrics": b.metrics,
            "last_source": b.source.value,
        }
        for device_id, b in sorted(latest.items())
    ]
    stmt = insert(devices)
    new = stmt.excluded
    newer = (devices.c.last_seen.is_(None)) | (new.last_seen > devices.c.last_seen)

    def if_newer(column: str):
        return case((newer, new[column]), else_=devices.c[column])

    stmt = stmt.on_conflict_do_update(
        index_elements=[devices.c.device_id],
        set_={
            "first_seen": func.least(devices.c.first_seen, new.first_seen),
            "last_seen": func.greatest(devices.c.last_seen, new.last_seen),
            "last_heartbeat_id": if_newer("last_heartbeat_id"),
            "last_seq": if_newer("last_seq"),
            "last_device_ts": if_newer("last_device_ts"),
            "last_metrics": if_newer("last_metrics"),
            "last_source": if_newer("last_source"),
            "version": devices.c.version + 1,
        },
    ).returning(*devices.c)
    return [DeviceState.from_row(r) for r in conn.execute(stmt.values(rows)).mappings()]


def _apply_statuses(
    conn: Connection, statuses: Sequence[StatusReport], default_interval_s: int
) -> list[DeviceState]:
    latest: dict[str, StatusReport] = {}
    for s in statuses:
        if s.device_id not in latest or s.received_at > latest[s.device_id].received_at:
            latest[s.device_id] = s
    rows = [
        {
            "device_id": device_id,
            "heartbeat_interval_s": default_interval_s,
            "reported_status": s.status.value,
            "reported_status_at": s.received_at,
        }
        for device_id, s in sorted(latest.items())
    ]
    stmt = insert(devices)
    new = stmt.excluded
    newer = devices.c.reported_status_at.is_(None) | (
        new.reported_status_at > devices.c.reported_status_at
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[devices.c.device_id],
        set_={
            "reported_status": case((newer, new.reported_status), else_=devices.c.reported_status),
            "reported_status_at": func.greatest(
                devices.c.reported_status_at, new.reported_status_at
            ),
            "version": devices.c.version + 1,
        },
    ).returning(*devices.c)
    return [DeviceState.from_row(r) for r in conn.execute(stmt.values(rows)).mappings()]


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
