"""Retention of dead letters and status events against a real PostgreSQL: rows older than
their period are deleted in batches, one run at a time, by the worker's maintenance and by
`gateway maintain`; 0 keeps everything."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from inprocess import worker_for
from sqlalchemy import Engine, create_engine, func, select, text
from support import apoll, serving, unique
from test_partitions import run_maintain

from gateway.storage import retention
from gateway.storage.engine import alembic_config, migrate
from gateway.storage.schema import device_events, rejected, rejected_counts

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


def age(engine: Engine, device: str, days: list[int]) -> None:
    """Dead letters, their hourly counts and status events of `device`, `days` days old."""
    with engine.begin() as conn:
        for n, ago in enumerate(days):
            at = NOW - timedelta(days=ago, minutes=n)
            conn.execute(
                rejected.insert().values(
                    id=uuid.uuid4(),
                    received_at=at,
                    reason="not_json",
                    detail="old",
                    source="mqtt",
                    device_id=device,
                    size=1,
                    payload=b"x",
                )
            )
            conn.execute(
                device_events.insert().values(
                    device_id=device,
                    from_status="online",
                    to_status="offline",
                    at=at,
                    reason="timeout",
                )
            )
            conn.execute(
                rejected_counts.insert().values(
                    hour=at.replace(minute=0, second=0, microsecond=0) - timedelta(hours=n),
                    device_key=device,
                    received=1,
                )
            )


def left(engine: Engine, device: str) -> tuple[int, int, int]:
    """Rows of `device` still there: dead letters, status events, hourly counts."""
    with engine.connect() as conn:
        return (
            conn.scalar(
                select(func.count()).select_from(rejected).where(rejected.c.device_id == device)
            ),
            conn.scalar(
                select(func.count())
                .select_from(device_events)
                .where(device_events.c.device_id == device)
            ),
            conn.scalar(
                select(func.count())
                .select_from(rejected_counts)
                .where(rejected_counts.c.device_key == device)
            ),
        )


def test_rows_past_their_period_are_deleted_in_batches(engine: Engine) -> None:
    device = unique()
    age(engine, device, [45, 40, 35, 31, 31, 31, 31, 20, 1, 0])
    done = retention.purge(engine, dead_letter_days=30, event_days=30, batch=2)
    assert not done.skipped
    assert done.deleted["rejected"] >= 7
    assert done.deleted["device_events"] >= 7
    assert left(engine, device) == (3, 3, 3)
    # Nothing of this device is left to delete; periods differ per table.
    retention.purge(engine, dead_letter_days=10, event_days=0)
    assert left(engine, device) == (2, 3, 2)


def test_zero_keeps_everything(engine: Engine) -> None:
    device = unique()
    age(engine, device, [400, 40])
    done = retention.purge(engine, dead_letter_days=0, event_days=0)
    assert done.deleted == {}
    assert left(engine, device) == (2, 2, 2)


def test_one_run_at_a_time(engine: Engine) -> None:
    """A run that finds another holding the lock leaves the work to it."""
    device = unique()
    age(engine, device, [40])
    with engine.begin() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": retention.RETENTION_LOCK})
        done = retention.purge(engine, dead_letter_days=30, event_days=30)
        assert done.skipped
        assert done.deleted == {}
    assert left(engine, device) == (1, 1, 1)
    assert not retention.purge(engine, dead_letter_days=30, event_days=30).skipped
    assert left(engine, device) == (0, 0, 0)


def test_a_stopping_worker_stops_between_batches(engine: Engine) -> None:
    device = unique()
    age(engine, device, [40, 40, 40])
    done = retention.purge(
        engine, dead_letter_days=30, event_days=30, batch=1, keep_going=lambda: False
    )
    assert done.deleted == {}
    assert left(engine, device) == (3, 3, 3)


def test_the_worker_applies_retention(vhost: str, stack, engine: Engine) -> None:
    device = unique()
    age(engine, device, [12, 3])

    async def scenario() -> None:
        worker = worker_for(vhost, stack, dead_letter_retention_days=10, event_retention_days=2)
        async with serving(worker):
            await apoll(lambda: left(engine, device) == (1, 0, 1), what="old rows deleted")

    asyncio.run(scenario())


def test_maintain_command_reports_what_it_deleted(stack, engine: Engine) -> None:
    device = unique()
    age(engine, device, [50, 1])
    done = run_maintain(stack, dead_letter_retention_days="30", event_retention_days="0")
    lines = done.stdout.splitlines()
    assert lines[0].startswith("partitions created:"), done.stdout
    assert lines[1].startswith("deleted: ") and lines[1].endswith(" 0 status events"), lines[1]
    assert int(lines[1].split()[1]) >= 1
    assert left(engine, device) == (1, 2, 1)


def test_migration_0005_up_and_down(stack) -> None:
    name = "gateway_" + unique("migration").replace("-", "_")
    admin = create_engine(stack.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = stack.database_url.rsplit("/", 1)[0] + "/" + name
    scratch = create_engine(url)

    def present() -> tuple[bool, bool]:
        with scratch.connect() as conn:
            return (
                conn.scalar(text("SELECT to_regclass('rejected_counts')")) is not None,
                conn.scalar(text("SELECT to_regclass('ix_device_events_at')")) is not None,
            )

    try:
        migrate(url)
        assert present() == (True, True)
        command.downgrade(alembic_config(url), "0004")
        assert present() == (False, False)
        migrate(url)
        assert present() == (True, True)
    finally:
        scratch.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
