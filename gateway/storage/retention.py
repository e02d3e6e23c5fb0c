"""Retention of dead letters and status events: rows older than their period are deleted by
maintenance, in batches, as heartbeats' daily partitions are dropped.

Batched DELETE by an indexed time column, not partitions: both tables are small next to
heartbeats (dead letters are capped per device and hour, status events happen on changes
only), so a few thousand index-ordered deletes an hour cost little; and partitioning would cost
more than it saves. A dead letter's `id` must stay unique across the whole table (a redelivered
one is skipped by `ON CONFLICT (id)`), which PostgreSQL enforces per partition only, and the
event list pages by its global `id`. Each batch is a transaction of its own, so locks and WAL
stay small and readers and writers never wait long.

One run at a time across workers (and `gateway maintain`): each batch takes an advisory
transaction lock first, and a run that finds it taken leaves the work to the holder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, text

from gateway.runtime import metrics

log = logging.getLogger(__name__)

#: Apart from the partitions' lock, so a partition made on the write path never waits for a
#: long purge.
RETENTION_LOCK = 0x6761_7465_7761_7903  # "gateway" + 3
BATCH_ROWS = 5000


@dataclass(frozen=True)
class Expiring:
    """A table whose rows expire by a time column (with an index that leads with it)."""

    table: str
    column: str


DEAD_LETTERS = Expiring("rejected", "received_at")
#: The cap's counts go with the dead letters of their hour.
DEAD_LETTER_COUNTS = Expiring("rejected_counts", "hour")
EVENTS = Expiring("device_events", "at")


@dataclass
class Purged:
    deleted: dict[str, int] = field(default_factory=dict)
    #: Another run held the lock: nothing (more) was done by this one.
    skipped: bool = False


def _delete_statement(expiring: Expiring):
    # By ctid: one index range scan finds a batch, and a TID scan deletes it.
    return text(
        f"DELETE FROM {expiring.table} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {expiring.table} "
        f"WHERE {expiring.column} < now() - make_interval(days => :days) "
        f"LIMIT :batch))"
    )


def delete_batch(engine: Engine, expiring: Expiring, days: int, batch: int) -> int | None:
    """Delete up to `batch` rows older than `days` days, in a transaction of its own; None
    when another run holds the lock."""
    with engine.begin() as conn:
        if not conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": RETENTION_LOCK}):
            return None
        conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        return conn.execute(_delete_statement(expiring), {"days": days, "batch": batch}).rowcount


def purge(
    engine: Engine,
    *,
    dead_letter_days: int,
    event_days: int,
    batch: int = BATCH_ROWS,
    keep_going: Callable[[], bool] = lambda: True,
) -> Purged:
    """Delete dead letters (and their hourly counts) older than `dead_letter_days` and status
    events older than `event_days` (0 keeps everything), `batch` rows per transaction, until
    none is left or `keep_going()` says stop (a stopping worker)."""
    done = Purged()
    for expiring, days in (
        (DEAD_LETTERS, dead_letter_days),
        (DEAD_LETTER_COUNTS, dead_letter_days),
        (EVENTS, event_days),
    ):
        if days <= 0:
            continue
        total = 0
        while keep_going():
            deleted = delete_batch(engine, expiring, days, batch)
            if deleted is None:
                done.skipped = True
                break
            total += deleted
            if deleted < batch:
                break
        if total:
            done.deleted[expiring.table] = total
            metrics.RETENTION_DELETED.labels(expiring.table).inc(total)
        if done.skipped:
            break
    return done


def run(
    engine: Engine,
    *,
    dead_letter_days: int,
    event_days: int,
    keep_going: Callable[[], bool] = lambda: True,
) -> Purged:
    """One purge, logged when it deleted something."""
    done = purge(
        engine, dead_letter_days=dead_letter_days, event_days=event_days, keep_going=keep_going
    )
    if done.deleted:
        log.info(
            "retention: deleted %s (dead letters after %s, status events after %s)",
            ", ".join(f"{n} from {table}" for table, n in done.deleted.items()),
            f"{dead_letter_days} days" if dead_letter_days else "never",
            f"{event_days} days" if event_days else "never",
        )
    return done
