"""Commands in PostgreSQL: create, read, and move forward through their lifecycle.

Every change of status is one conditional UPDATE (`... WHERE status IN (<the statuses it may
leave>)`), so two processes racing (a reply and the expiry sweep, a cancel and the dispatcher)
can never move a command backwards: whoever comes second changes nothing. Each change is
announced with NOTIFY on `CHANNEL` in the same transaction (delivered on commit), for the
api's event stream and its long-polling devices.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, or_, select, text, tuple_, update
from sqlalchemy.sql import ColumnElement

from gateway.contract.commands import (
    LIVE,
    Command,
    CommandReply,
    CommandRequest,
    CommandStatus,
    expiry,
)
from gateway.contract.messages import utcnow
from gateway.contract.reasons import InputError, Reason
from gateway.runtime import metrics
from gateway.storage.reads import _time_id, encode_cursor
from gateway.storage.schema import commands, devices
from gateway.storage.views import Page

#: PostgreSQL NOTIFY channel of command status changes.
CHANNEL = "gateway_commands"
LIVE_VALUES = [s.value for s in LIVE]
#: Live commands a device is handed at once (the oldest first).
MAX_HANDED = 20
#: How long a dispatcher's claim on the commands it publishes lasts.
CLAIM_LEASE_S = 10.0


class UnknownDevice(LookupError):
    pass


def _command(row: Any) -> Command:
    return Command.model_validate(dict(row._mapping))


def _notify(conn: Connection, rows: list[Command]) -> None:
    for c in rows:
        metrics.COMMAND_CHANGES.labels(c.status.value).inc()
        payload = {
            "id": str(c.id),
            "device_id": c.device_id,
            "name": c.name,
            "status": c.status.value,
            "at": (c.finished_at or c.sent_at or c.created_at).isoformat(),
        }
        conn.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": CHANNEL, "payload": json.dumps(payload)},
        )


def create(
    conn: Connection, device_id: str, request: CommandRequest, now: datetime | None = None
) -> Command:
    """Store a command `pending`; `UnknownDevice` when no such device is registered."""
    now = now or utcnow()
    exists = conn.execute(
        select(devices.c.device_id).where(devices.c.device_id == device_id)
    ).first()
    if exists is None:
        raise UnknownDevice(f"no device {device_id!r}")
    row = conn.execute(
        commands.insert()
        .values(
            id=uuid.uuid4(),
            device_id=device_id,
            name=request.name,
            args=request.args,
            status=CommandStatus.PENDING.value,
            created_at=now,
            expires_at=expiry(request.ttl_s, now),
        )
        .returning(*commands.c)
    ).one()
    command = _command(row)
    _notify(conn, [command])
    return command


def get(conn: Connection, command_id: uuid.UUID) -> Command | None:
    row = conn.execute(select(commands).where(commands.c.id == command_id)).first()
    return _command(row) if row is not None else None


def list_for_device(
    conn: Connection,
    device_id: str,
    *,
    status: CommandStatus | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[Command]:
    """A device's commands, newest first, keyset-paginated."""
    query = select(commands).where(commands.c.device_id == device_id)
    if status is not None:
        query = query.where(commands.c.status == status.value)
    if cursor:
        key = _time_id(cursor)
        query = query.where(tuple_(commands.c.created_at, commands.c.id) < key)
    rows = conn.execute(
        query.order_by(commands.c.created_at.desc(), commands.c.id.desc()).limit(limit + 1)
    ).all()
    items = [_command(r) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = items[-1]
        next_cursor = encode_cursor(last.created_at.isoformat(), str(last.id))
    return Page[Command](items=items, next_cursor=next_cursor)


def cancel(conn: Connection, command_id: uuid.UUID, now: datetime | None = None) -> Command | None:
    """Cancel a command still `pending` and not being published (claimed by a dispatcher);
    None otherwise."""
    now = now or utcnow()
    row = conn.execute(
        update(commands)
        .where(
            commands.c.id == command_id,
            commands.c.status == CommandStatus.PENDING.value,
            _unclaimed(now),
        )
        .values(status=CommandStatus.CANCELLED.value, finished_at=now)
        .returning(*commands.c)
    ).first()
    if row is None:
        return None
    command = _command(row)
    _notify(conn, [command])
    return command


def _unclaimed(now: datetime) -> ColumnElement[bool]:
    return or_(commands.c.claimed_until.is_(None), commands.c.claimed_until <= now)


def claim_pending(
    conn: Connection, limit: int, *, lease_s: float = CLAIM_LEASE_S, now: datetime | None = None
) -> list[Command]:
    """Pending, live commands nobody is publishing, the oldest first, claimed for `lease_s`:
    other dispatchers leave them alone until the lease ends (a dispatcher that died holding it
    leaves them to the next one then). Commit at once: no row stays locked while they are
    published, so a reply that arrives before `mark_sent` never waits for it."""
    now = now or utcnow()
    free = (
        select(commands.c.id)
        .where(
            commands.c.status == CommandStatus.PENDING.value,
            commands.c.expires_at > now,
            _unclaimed(now),
        )
        .order_by(commands.c.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = conn.execute(
        update(commands)
        .where(commands.c.id.in_(free))
        .values(claimed_until=now + timedelta(seconds=lease_s))
        .returning(*commands.c)
    ).all()
    return sorted((_command(r) for r in rows), key=lambda c: c.created_at)


def release(conn: Connection, ids: list[uuid.UUID]) -> None:
    """End the claim on commands the broker did not confirm: the next pass takes them."""
    if ids:
        conn.execute(
            update(commands)
            .where(commands.c.id.in_(ids), commands.c.status == CommandStatus.PENDING.value)
            .values(claimed_until=None)
        )


def mark_sent(
    conn: Connection, ids: list[uuid.UUID], via: str, now: datetime | None = None
) -> list[Command]:
    """`pending` -> `sent` for these commands (those no longer pending are left alone)."""
    if not ids:
        return []
    rows = conn.execute(
        update(commands)
        .where(commands.c.id.in_(ids), commands.c.status == CommandStatus.PENDING.value)
        .values(status=CommandStatus.SENT.value, sent_at=now or utcnow(), sent_via=via)
        .returning(*commands.c)
    ).all()
    changed = [_command(r) for r in rows]
    _notify(conn, changed)
    return changed


def live_for_device(conn: Connection, device_id: str, now: datetime | None = None) -> list[Command]:
    """What a device should have: its live commands, not expired, the oldest first."""
    rows = conn.execute(
        select(commands)
        .where(
            commands.c.device_id == device_id,
            commands.c.status.in_(LIVE_VALUES),
            commands.c.expires_at > (now or utcnow()),
        )
        .order_by(commands.c.created_at)
        .limit(MAX_HANDED)
    ).all()
    return [_command(r) for r in rows]


def hand_to_http_device(
    conn: Connection, device_id: str, now: datetime | None = None
) -> list[Command]:
    """The live commands of a device answered over HTTP; the pending ones become `sent`."""
    now = now or utcnow()
    live = live_for_device(conn, device_id, now)
    pending = [c.id for c in live if c.status == CommandStatus.PENDING]
    mark_sent(conn, pending, "http", now)
    return live


def expire_due(conn: Connection, now: datetime | None = None, limit: int = 1000) -> list[Command]:
    """Live commands past `expires_at` become `expired`."""
    now = now or utcnow()
    due = (
        select(commands.c.id)
        .where(commands.c.status.in_(LIVE_VALUES), commands.c.expires_at <= now)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = conn.execute(
        update(commands)
        .where(commands.c.id.in_(due), commands.c.status.in_(LIVE_VALUES))
        .values(status=CommandStatus.EXPIRED.value, finished_at=now)
        .returning(*commands.c)
    ).all()
    changed = [_command(r) for r in rows]
    _notify(conn, changed)
    return changed


@dataclass(frozen=True)
class ReplyApplied:
    """The reply moved its command to `succeeded` or `failed` (`command`), or it was a
    repeat of the one already stored (`command` None), or it is refused (`error`)."""

    command: Command | None = None
    error: InputError | None = None


def apply_reply(conn: Connection, reply: CommandReply) -> ReplyApplied:
    """Store a device's reply once: the first one for a live command of its own wins; a
    repeat changes nothing; any other is refused with its reason (a dead letter)."""
    row = conn.execute(
        select(commands).where(commands.c.id == reply.command_id).with_for_update()
    ).first()
    if row is None:
        return ReplyApplied(error=_refusal(Reason.UNKNOWN_COMMAND, "no command has id", reply))
    command = _command(row)
    if command.device_id != reply.device_id:
        # Said as for an unknown id: a device learns nothing of another device's commands.
        return ReplyApplied(error=_refusal(Reason.FOREIGN_COMMAND, "not a command of", reply))
    if command.status in (CommandStatus.SUCCEEDED, CommandStatus.FAILED):
        return ReplyApplied()  # stored once, however often it arrives
    if command.status == CommandStatus.CANCELLED:
        return ReplyApplied(error=_refusal(Reason.COMMAND_CANCELLED, "cancelled:", reply))
    if command.status == CommandStatus.EXPIRED or reply.received_at >= command.expires_at:
        if command.status != CommandStatus.EXPIRED:
            expired = conn.execute(
                update(commands)
                .where(commands.c.id == command.id, commands.c.status.in_(LIVE_VALUES))
                .values(status=CommandStatus.EXPIRED.value, finished_at=utcnow())
                .returning(*commands.c)
            ).all()
            _notify(conn, [_command(r) for r in expired])
        return ReplyApplied(error=_refusal(Reason.COMMAND_EXPIRED, "expired:", reply))
    now = utcnow()
    done = conn.execute(
        update(commands)
        .where(commands.c.id == command.id, commands.c.status.in_(LIVE_VALUES))
        .values(
            status=reply.status.value,
            result=reply.result,
            finished_at=now,
            # A reply to a command still `pending` (its dispatcher died between the broker's
            # confirm and its update): the device had it.
            sent_at=func.coalesce(commands.c.sent_at, reply.received_at),
            sent_via=func.coalesce(commands.c.sent_via, reply.source.value),
        )
        .returning(*commands.c)
    ).one()
    applied = _command(done)
    _notify(conn, [applied])
    return ReplyApplied(command=applied)


def _refusal(reason: Reason, what: str, reply: CommandReply) -> InputError:
    details = {
        Reason.UNKNOWN_COMMAND: f"reply to {reply.command_id}: no command has this id",
        Reason.FOREIGN_COMMAND: (
            f"reply to {reply.command_id}: not a command of device {reply.device_id!r}"
        ),
        Reason.COMMAND_CANCELLED: f"reply to {reply.command_id}: the command was cancelled",
        Reason.COMMAND_EXPIRED: (
            f"reply to {reply.command_id}: the command expired before the reply arrived"
        ),
    }
    return InputError(reason, details.get(reason, what))
