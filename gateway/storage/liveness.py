"""Liveness: when a device is online or offline, every change recorded as an event and announced.

A device is `online` from a heartbeat (or its own `online` status message) until its deadline,
`last_seen + factor x interval`; then the sweeper marks it `offline` (reason `timeout`). Its Last
Will (`offline` on its status topic) marks it offline at once (reason `last_will`). Each change
is a row in `device_events`, written in the same transaction as the state, and announced with
PostgreSQL NOTIFY on commit, so the api streams exactly what was stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import Connection, any_, bindparam, func, insert, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import Text

from gateway.contract.messages import DeviceStatus
from gateway.storage.mirror import DeviceState
from gateway.storage.schema import device_events, devices

#: PostgreSQL NOTIFY channel of status changes.
CHANNEL = "gateway_status"
#: The sweeper's advisory lock: whoever holds it is the one sweeper, however many workers run.
SWEEPER_LOCK = 0x6761_7465_7761_7901  # "gateway" + 1


class StatusEvent(BaseModel):
    """One change of a device's status."""

    id: int | None = None
    device_id: str
    from_status: DeviceStatus
    to_status: DeviceStatus
    at: datetime
    reason: str


_LOCK_STATUSES = (
    select(devices.c.device_id, devices.c.status, devices.c.enabled)
    .where(devices.c.device_id == any_(bindparam("ids", type_=ARRAY(Text))))
    .order_by(devices.c.device_id)
    .with_for_update()
)


@dataclass(frozen=True)
class Locked:
    #: The current status of each device that exists.
    status: dict[str, DeviceStatus]
    #: The devices among them that are disabled.
    disabled: frozenset[str]


def lock_statuses(conn: Connection, device_ids: list[str]) -> Locked:
    """The current status of these devices, row-locked until commit (in id order: no deadlock),
    so that neither their status nor whether they are enabled changes before the commit."""
    rows = conn.execute(_LOCK_STATUSES, {"ids": sorted(set(device_ids))}).all()
    return Locked(
        {device_id: DeviceStatus(status) for device_id, status, _ in rows},
        frozenset(device_id for device_id, _, enabled in rows if not enabled),
    )


def record_changes(
    conn: Connection, before: dict[str, DeviceStatus], after: list[DeviceState]
) -> list[StatusEvent]:
    """Store an event for every device whose status changed, and announce them on commit."""
    events = [
        StatusEvent(
            device_id=state.device_id,
            from_status=before.get(state.device_id, DeviceStatus.NEVER_SEEN),
            to_status=state.status,
            at=state.status_changed_at,
            reason=state.status_reason or "heartbeat",
        )
        for state in after
        if state.status != before.get(state.device_id, DeviceStatus.NEVER_SEEN)
        and state.status_changed_at is not None
    ]
    if not events:
        return []
    rows = conn.execute(
        insert(device_events).returning(device_events.c.id),
        [e.model_dump(exclude={"id"}, mode="json") | {"at": e.at} for e in events],
    ).all()
    events = [e.model_copy(update={"id": row.id}) for e, row in zip(events, rows, strict=True)]
    conn.execute(
        text("SELECT pg_notify(:channel, payload) FROM unnest(:payloads) AS payload").bindparams(
            bindparam("payloads", type_=ARRAY(Text))
        ),
        {"channel": CHANNEL, "payloads": [e.model_dump_json() for e in events]},
    )
    return events


def sweep(conn: Connection, limit: int = 5000) -> tuple[list[DeviceState], list[StatusEvent]]:
    """Mark online devices whose deadline has passed offline (reason `timeout`).

    Uses the partial index on `offline_deadline WHERE status = 'online'`: the cost is the number
    of devices that expired, never the size of the fleet.
    """
    expired = (
        select(devices.c.device_id)
        .where(devices.c.status == "online", devices.c.offline_deadline <= func.now())
        .order_by(devices.c.offline_deadline)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("expired")
    )
    changed = conn.execute(
        devices.update()
        .where(devices.c.device_id == expired.c.device_id)
        .values(
            status="offline",
            status_changed_at=func.now(),
            status_reason="timeout",
            version=devices.c.version + 1,
        )
        .returning(*devices.c)
    ).mappings()
    states = [DeviceState.from_row(row) for row in changed]
    before = {state.device_id: DeviceStatus.ONLINE for state in states}
    return states, record_changes(conn, before, states)
