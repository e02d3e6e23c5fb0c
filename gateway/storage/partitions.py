"""Daily partitions of `heartbeats`: created ahead, dropped after the retention period, and the
lock that keeps the idempotency key exact across them.

Heartbeats are partitioned by `stored_on`, the UTC day (database clock) of the transaction that
stored them, not by a device's or the bridge's clock. Every copy of a message stored on the same
day meets the same primary key `(id, stored_on)`, so `ON CONFLICT DO NOTHING` skips it. A copy
stored on a later day (a retry that crosses midnight, or a backlog drained the next day) is found
by looking its id up in the older partitions before the insert.

That lookup would miss a row that a transaction still open from the day before is inserting. So
a transaction that stores rows holds a shared lock on its day, and proves, once it holds it, that
the day had not ended yet; before looking back, a transaction of the next day waits for those
locks to go. Writers of the same day never wait for each other.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from gateway.storage.schema import heartbeats

log = logging.getLogger(__name__)

PARENT = "heartbeats"
#: First of the two int4 advisory-lock keys: "gw" + "day". The second is the day number.
DAY_LOCK = 0x6777_6479
#: One maintenance run at a time (bigint key space, apart from DAY_LOCK's).
MAINTENANCE_LOCK = 0x6761_7465_7761_7902  # "gateway" + 2
EPOCH = date(2000, 1, 1)
NAME_RE = re.compile(rf"^{PARENT}_(\d{{8}})$")


class DayTurned(SQLAlchemyError):
    """The UTC day ended while a write was starting; run it again (it will store under the new
    day)."""


def partition_name(day: date) -> str:
    return f"{PARENT}_{day:%Y%m%d}"


# The shared lock on the transaction's day is taken, then the clock is read again: a writer that
# got its lock after midnight gives up (and runs again under the new day). The probe of the
# previous day's lock waits for that day's writers; it is session-level and released at once, so
# writers of the new day do not queue behind each other.
_CLAIM = text(
    f"""
    WITH held AS MATERIALIZED (
      SELECT d, pg_advisory_xact_lock_shared({DAY_LOCK}, d - DATE '{EPOCH}') AS locked
      FROM (SELECT (now() AT TIME ZONE 'UTC')::date AS d) AS t
    ), checked AS MATERIALIZED (
      SELECT d, (clock_timestamp() AT TIME ZONE 'UTC')::date = d AS in_time FROM held
    ), drained AS MATERIALIZED (
      SELECT d, in_time, pg_advisory_lock({DAY_LOCK}, d - 1 - DATE '{EPOCH}') AS waited
      FROM checked
    )
    SELECT d, in_time, pg_advisory_unlock({DAY_LOCK}, d - 1 - DATE '{EPOCH}') AS released
    FROM drained
    """
)


def claim_day(conn: Connection) -> date:
    """The day this transaction stores heartbeats under, with the lock described above.

    Call it first in the writing transaction; raises `DayTurned` (retry) at midnight's edge."""
    try:
        day, in_time, _ = conn.execute(_CLAIM).one()
    except DBAPIError:
        # Should the statement fail between its lock and unlock of the previous day, that
        # session-level lock would outlive the transaction: close the session, and it goes.
        conn.invalidate()
        raise
    if not in_time:
        raise DayTurned(f"the UTC day ended as this write started ({day} is over)")
    return day


#: Days whose partition is known to exist (this process saw it; a day is never dropped early).
_present: set[date] = set()


def ensure(conn: Connection, day: date) -> None:
    """Make sure `day` has a partition. Maintenance creates them days ahead; this is the safety
    net when it could not, so a heartbeat never fails for want of a partition."""
    if day in _present:
        return
    if conn.scalar(text("SELECT to_regclass(:name)"), {"name": partition_name(day)}) is not None:
        _present.add(day)
        return
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MAINTENANCE_LOCK})
    log.warning("no partition for %s was made ahead; creating it now", day)
    create(conn, day)


# ---- reads ----------------------------------------------------------------------------------

#: How far a bridge's or api's clock may run ahead of the database's (a heartbeat received at T
#: is stored on or after T's day, less this).
CLOCK_MARGIN = timedelta(days=1)


def stored_since(since: datetime | None) -> list:
    """The partitions that can hold heartbeats received since `since`: a row is stored after it
    is received, so older days' partitions are skipped (only a lower bound: a backlog drained
    today holds rows received yesterday). Total: a `since` within the margin of the earliest
    time there is prunes nothing."""
    if since is None or since - datetime.min.replace(tzinfo=since.tzinfo) < CLOCK_MARGIN:
        return []
    return [heartbeats.c.stored_on >= (since - CLOCK_MARGIN).date()]


# ---- maintenance -------------------------------------------------------------------------------


@dataclass
class Maintenance:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    skipped: bool = False


def existing(conn: Connection) -> dict[date, str]:
    """The partitions of `heartbeats`, by day."""
    names = conn.scalars(
        text(
            "SELECT c.relname FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = CAST(:parent AS regclass)"
        ),
        {"parent": PARENT},
    ).all()
    days = {}
    for name in names:
        match = NAME_RE.match(name)
        if match:
            days[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return days


def create(conn: Connection, day: date) -> str:
    name = partition_name(day)
    conn.execute(
        text(
            f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {PARENT} "
            f"FOR VALUES FROM ('{day}') TO ('{day + timedelta(days=1)}')"
        )
    )
    return name


def maintain(
    conn: Connection, *, ahead_days: int, retention_days: int, now: date | None = None
) -> Maintenance:
    """Create the partitions of yesterday, today and `ahead_days` days to come; drop those
    wholly older than `retention_days` (0 keeps everything).

    Runs in the caller's transaction, under an advisory lock (several workers may call it). A
    drop waits at most a few seconds for the table's readers, then is left for the next run."""
    done = Maintenance()
    if not conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": MAINTENANCE_LOCK}):
        done.skipped = True
        return done
    conn.execute(text("SET LOCAL lock_timeout = '5s'"))
    now = now or conn.scalar(text("SELECT (now() AT TIME ZONE 'UTC')::date"))
    have = existing(conn)
    for offset in range(-1, ahead_days + 1):
        day = now + timedelta(days=offset)
        if day not in have:
            done.created.append(create(conn, day))
    if retention_days > 0:
        # A partition goes once its newest possible row is older than the retention period.
        oldest_kept = now - timedelta(days=retention_days)
        for day, name in sorted(have.items()):
            if day < oldest_kept:
                conn.execute(text(f"DROP TABLE {name}"))
                done.dropped.append(name)
    return done


def run(engine: Engine, *, ahead_days: int, retention_days: int) -> Maintenance:
    """One maintenance run in a transaction of its own, logged when it changed something."""
    with engine.begin() as conn:
        done = maintain(conn, ahead_days=ahead_days, retention_days=retention_days)
    if done.created or done.dropped:
        log.info(
            "heartbeat partitions: created %s; dropped %s (retention %s)",
            ", ".join(done.created) or "none",
            ", ".join(done.dropped) or "none",
            f"{retention_days} days" if retention_days else "off",
        )
    return done
