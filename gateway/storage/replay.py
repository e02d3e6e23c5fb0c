"""Replaying dead letters: once the cause is fixed, put chosen entries back through the pipeline.

Each dead letter is converted again exactly as it was first received (the same topic or device,
the same raw bytes, the same receive time) and, when it is now valid, published to the work
queue with the broker's confirm; then it is marked replayed. One that is still invalid stays as
it is and is reported with today's reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, select, update

from gateway.contract.conversion import Forward, Ignore, Reject, convert, heartbeat_from
from gateway.contract.messages import Heartbeat, Source, StatusReport, WorkBatch, read_work, utcnow
from gateway.contract.reasons import InputError, Reason
from gateway.contract.topics import mqtt_topic
from gateway.storage.reads import rejected_conditions
from gateway.storage.schema import rejected


@dataclass(frozen=True)
class Filters:
    device_id: str | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ids: tuple[uuid.UUID, ...] = ()
    include_replayed: bool = False
    limit: int = 1000


@dataclass
class Plan:
    """What a replay would do: messages to publish, and entries that are still invalid."""

    ready: list[tuple[uuid.UUID, Heartbeat | StatusReport]] = field(default_factory=list)
    still_invalid: list[tuple[uuid.UUID, str]] = field(default_factory=list)


def select_entries(conn: Connection, filters: Filters) -> list:
    r = rejected.c
    query = (
        select(rejected)
        .where(
            *rejected_conditions(filters.device_id, filters.reason, filters.since, filters.until)
        )
        .order_by(r.received_at, r.id)
        .limit(filters.limit)
    )
    if filters.ids:
        query = query.where(r.id.in_(filters.ids))
    if not filters.include_replayed:
        query = query.where(r.replayed_at.is_(None))
    return list(conn.execute(query).mappings())


def convert_again(entry) -> Heartbeat | StatusReport | WorkBatch:
    """The canonical message a dead letter becomes today; raises `InputError` if none."""
    if entry["reason"] == Reason.OVER_CAP:
        raise InputError(Reason.OVER_CAP, "a count of dead letters that were not kept")
    payload = bytes(entry["payload"])
    if entry["size"] > len(payload):
        raise InputError(Reason(entry["reason"]), "the payload was cut when stored; not replayable")
    source = Source(entry["source"])
    if source == Source.MQTT:
        routing_key = mqtt_topic(entry["topic"] or "")  # the mapping is its own inverse
        outcome = convert(routing_key, payload, entry["received_at"])
        match outcome:
            case Forward(message):
                return message
            case Reject(rejection):
                raise InputError(rejection.reason, rejection.detail)
            case Ignore(why):
                raise InputError(Reason(entry["reason"]), why)
    if source == Source.HTTP:
        return heartbeat_from(entry["device_id"], payload, Source.HTTP, entry["received_at"])
    items, invalid = read_work(payload)
    if invalid or not items:
        detail = invalid[0].detail if invalid else "no message"
        raise InputError(Reason(entry["reason"]), f"still not a canonical message: {detail}")
    return items[0] if len(items) == 1 else WorkBatch(items=items)


def plan(entries: list) -> Plan:
    result = Plan()
    for entry in entries:
        try:
            result.ready.append((entry["id"], convert_again(entry)))
        except InputError as error:
            result.still_invalid.append((entry["id"], f"{error.reason}: {error.detail}"))
    return result


def mark_replayed(conn: Connection, ids: list[uuid.UUID]) -> None:
    if ids:
        conn.execute(update(rejected).where(rejected.c.id.in_(ids)).values(replayed_at=utcnow()))
