"""Daily partitions of heartbeats against a real PostgreSQL: the idempotency key across them,
the lock at midnight's edge, partitions made ahead, retention, and the migration itself."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from support import plan_of, poll, statements_run_by, unique

from gateway.contract.messages import DEDUP_WINDOW_DAYS, Heartbeat, Source
from gateway.contract.payload import HeartbeatPayload
from gateway.storage import partitions, writes
from gateway.storage import reads as queries
from gateway.storage.engine import alembic_config, migrate
from gateway.storage.schema import heartbeats

pytestmark = pytest.mark.integration


def beat(device: str, msg_id: str, at: datetime | None = None) -> Heartbeat:
    payload = HeartbeatPayload(msg_id=msg_id, metrics={"cpu": 1.0})
    return Heartbeat.from_payload(device, payload, Source.MQTT, received_at=at)


def db_today(engine: Engine) -> date:
    with engine.connect() as conn:
        return conn.scalar(text("SELECT (now() AT TIME ZONE 'UTC')::date"))


def stored_days(engine: Engine, device: str) -> list[date]:
    with engine.connect() as conn:
        return conn.scalars(
            select(heartbeats.c.stored_on)
            .where(heartbeats.c.device_id == device)
            .order_by(heartbeats.c.stored_on)
        ).all()


def write(engine: Engine, beats: list[Heartbeat]) -> writes.BatchResult:
    with engine.begin() as conn:
        return writes.write_batch(conn, beats)


def test_a_retry_is_stored_once_across_partitions(engine: Engine) -> None:
    device = unique()
    today = db_today(engine)
    first = write(engine, [beat(device, "m-1"), beat(device, "m-2")])
    assert (first.inserted, first.duplicates) == (2, 0)
    # As if both were stored yesterday (an UPDATE of the key moves a row to that partition).
    with engine.begin() as conn:
        conn.execute(
            heartbeats.update()
            .where(heartbeats.c.device_id == device)
            .values(stored_on=today - timedelta(days=1))
        )
    again = write(engine, [beat(device, "m-1"), beat(device, "m-2"), beat(device, "m-3")])
    assert (again.inserted, again.duplicates) == (1, 2)
    assert stored_days(engine, device) == [today - timedelta(days=1)] * 2 + [today]
    # And once more today: the primary key (id, stored_on) catches it.
    assert write(engine, [beat(device, "m-3")]).duplicates == 1


def test_the_lookup_reaches_back_as_far_as_the_window(engine: Engine) -> None:
    device = unique()
    today = db_today(engine)
    old = today - timedelta(days=DEDUP_WINDOW_DAYS + 1)
    write(engine, [beat(device, "old")])
    with engine.begin() as conn:
        partitions.ensure(conn, old)
        conn.execute(
            heartbeats.update().where(heartbeats.c.device_id == device).values(stored_on=old)
        )
    with engine.begin() as conn:  # window 0: every day kept
        assert writes.write_batch(conn, [beat(device, "old")], dedup_window_days=0).inserted == 0
    with engine.begin() as conn:  # beyond the window: stored again, as documented
        assert writes.write_batch(conn, [beat(device, "old")]).inserted == 1
    assert stored_days(engine, device) == [old, today]


def test_a_writer_of_the_new_day_waits_for_the_old_days_writers(engine: Engine) -> None:
    """A transaction of yesterday, still open, inserting a heartbeat that today's batch also
    carries: today's writer waits for it (PostgreSQL shows it blocked by that transaction),
    then sees the row and skips its copy."""
    device = unique()
    yesterday = db_today(engine) - timedelta(days=1)
    copy = beat(device, "midnight")
    order: list[str] = []
    writer_pid: list[int] = []

    def todays_writer() -> None:
        with engine.begin() as conn:
            writer_pid.append(conn.scalar(text("SELECT pg_backend_pid()")))
            inserted = writes.write_batch(conn, [copy]).inserted
        order.append(f"today's writer done, {inserted} inserted")

    with engine.connect() as old:
        with old.begin():
            old_pid = old.scalar(text("SELECT pg_backend_pid()"))
            day_number = (yesterday - partitions.EPOCH).days
            old.execute(
                text("SELECT pg_advisory_xact_lock_shared(:ns, :day)"),
                {"ns": partitions.DAY_LOCK, "day": day_number},
            )
            old.execute(
                heartbeats.insert().values(
                    id=copy.id,
                    stored_on=yesterday,
                    device_id=device,
                    msg_id=copy.msg_id,
                    received_at=copy.received_at,
                    source="mqtt",
                    metrics={},
                )
            )
            writer = threading.Thread(target=todays_writer)
            writer.start()
            poll(lambda: writer_pid, what="today's writer to start")

            def blocked_by_old() -> bool:
                with engine.connect() as conn:
                    blockers = conn.scalar(
                        text("SELECT pg_blocking_pids(:pid)"), {"pid": writer_pid[0]}
                    )
                return old_pid in blockers

            poll(blocked_by_old, what="today's writer to wait for yesterday's")
            assert order == [], "today's writer did not wait for yesterday's"
            order.append("yesterday's writer commits")
        writer.join(timeout=30)
    assert order == ["yesterday's writer commits", "today's writer done, 0 inserted"]
    assert stored_days(engine, device) == [yesterday]


def test_writers_of_the_same_day_do_not_wait_for_each_other(engine: Engine) -> None:
    results: list[int] = []
    with engine.connect() as open_writer, open_writer.begin():
        writes.write_batch(open_writer, [beat(unique(), "a")])  # holds today's shared lock
        other = threading.Thread(
            target=lambda: results.append(write(engine, [beat(unique(), "b")]).inserted)
        )
        other.start()
        other.join(timeout=30)
        assert results == [1], "a second writer of the same day waited for the first"


def test_maintenance_makes_partitions_ahead_and_drops_expired(engine: Engine) -> None:
    today = db_today(engine)
    old_days = [today - timedelta(days=n) for n in (45, 31)]
    with engine.begin() as conn:
        for day in old_days:
            partitions.create(conn, day)
        conn.execute(
            heartbeats.insert().values(
                id=beat(unique(), "old").id,
                stored_on=old_days[0],
                device_id="old",
                msg_id="old",
                received_at=datetime.combine(old_days[0], datetime.min.time(), UTC),
                source="mqtt",
                metrics={},
            )
        )
    with engine.begin() as conn:
        done = partitions.maintain(conn, ahead_days=5, retention_days=30)
    assert sorted(done.dropped) == [partitions.partition_name(d) for d in old_days]
    with engine.connect() as conn:
        have = partitions.existing(conn)
    for offset in range(-1, 6):
        assert today + timedelta(days=offset) in have
    assert not set(old_days) & set(have)
    # Nothing left to do: a second run changes nothing; retention 0 drops nothing.
    with engine.begin() as conn:
        again = partitions.maintain(conn, ahead_days=5, retention_days=0)
    assert (again.created, again.dropped) == ([], [])


def run_maintain(stack, **settings: str) -> subprocess.CompletedProcess[str]:
    """`gateway maintain` on the test stack's database, with these `GATEWAY_*` settings."""
    env = {**os.environ, "GATEWAY_DATABASE_URL": stack.database_url}
    env.update({f"GATEWAY_{name.upper()}": value for name, value in settings.items()})
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "maintain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_maintain_command(stack) -> None:
    done = run_maintain(stack, retention_days="30", partitions_ahead_days="4")
    assert done.stdout.startswith("partitions created:"), done.stdout


def test_a_missing_partition_is_made_rather_than_failing_the_batch(engine: Engine) -> None:
    """If maintenance could not run ahead of today, the batch creates today's partition."""
    device = unique()
    far = db_today(engine) + timedelta(days=400)
    with engine.begin() as conn:
        partitions.ensure(conn, far)
        assert conn.scalar(text("SELECT to_regclass(:n)"), {"n": partitions.partition_name(far)})
        conn.execute(text(f"DROP TABLE {partitions.partition_name(far)}"))
    assert write(engine, [beat(device, "x")]).inserted == 1


def test_a_drop_waits_a_while_for_readers_then_is_left_for_the_next_run(engine: Engine) -> None:
    """A reader holds an expired partition: maintenance gives up on it with a lock timeout
    (lock_not_available, never an endless wait) and changes nothing; the next run drops it."""
    expired = db_today(engine) - timedelta(days=45)
    with engine.begin() as conn:
        name = partitions.create(conn, expired)
    with engine.connect() as reader, reader.begin():
        reader.execute(text(f"SELECT count(*) FROM {name}"))  # holds it until commit
        with pytest.raises(OperationalError) as gave_up:
            partitions.run(engine, ahead_days=3, retention_days=30)
        assert gave_up.value.orig.pgcode == "55P03", gave_up.value
    with engine.connect() as conn:
        assert expired in partitions.existing(conn)
    assert name in partitions.run(engine, ahead_days=3, retention_days=30).dropped


def test_reads_with_since_skip_the_partitions_of_earlier_days(engine: Engine) -> None:
    """The plans of the history and metrics reads, as the api runs them: with `since` an hour
    ago, no partition before yesterday is read; without it, every one is."""
    today = db_today(engine)
    with engine.begin() as conn:
        partitions.ensure(conn, today)
        old = partitions.create(conn, today - timedelta(days=10))
    since = datetime.now(UTC) - timedelta(hours=1)
    reads = {
        "history": lambda conn: queries.list_heartbeats(conn, "d-1", since=since),
        "metrics": lambda conn: queries.metric_series(
            conn,
            "d-1",
            ["cpu"],
            since=since,
            until=since + timedelta(hours=1),
            bucket="1m",
            agg="avg",
        ),
    }
    for what, read in reads.items():
        plans = [plan_of(engine, *sql) for sql in statements_run_by(engine, read)]
        plan = "\n".join(plans)
        assert partitions.partition_name(today) in plan, (what, plan)
        assert old not in plan, (what, plan)
    everything = "\n".join(
        plan_of(engine, *sql)
        for sql in statements_run_by(engine, lambda conn: queries.list_heartbeats(conn, "d-1"))
    )
    assert old in everything


def test_history_reads_every_partition_newest_first(engine: Engine) -> None:
    device = unique()
    now = datetime.now(UTC)
    today = db_today(engine)
    write(engine, [beat(device, f"h-{i}", now - timedelta(hours=3 - i)) for i in range(4)])
    with engine.begin() as conn:  # the two oldest as stored two days ago and yesterday
        partitions.ensure(conn, today - timedelta(days=2))
        for i, days_ago in ((0, 2), (1, 1)):
            conn.execute(
                heartbeats.update()
                .where(heartbeats.c.device_id == device, heartbeats.c.msg_id == f"h-{i}")
                .values(stored_on=today - timedelta(days=days_ago))
            )
    with engine.connect() as conn:
        page = queries.list_heartbeats(conn, device, limit=3)
        rest = queries.list_heartbeats(conn, device, limit=3, cursor=page.next_cursor)
        since = queries.list_heartbeats(conn, device, since=now - timedelta(hours=2, minutes=30))
    assert [h.msg_id for h in page.items + rest.items] == ["h-3", "h-2", "h-1", "h-0"]
    assert [h.msg_id for h in since.items] == ["h-3", "h-2", "h-1"]


def test_migration_moves_existing_heartbeats_into_partitions(stack) -> None:
    """0003 -> 0004 on a database with heartbeats: every row kept, under the day it was stored."""
    name = "gateway_" + unique("migration").replace("-", "_")
    admin = create_engine(stack.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = stack.database_url.rsplit("/", 1)[0] + "/" + name
    scratch = create_engine(url)
    try:
        migrate(url, "0003")
        with scratch.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO heartbeats (id, device_id, msg_id, received_at, stored_at, "
                    "source, metrics) SELECT gen_random_uuid(), 'd', 'm' || i, "
                    "now() - i * interval '1 day', now() - i * interval '1 day', 'mqtt', '{}' "
                    "FROM generate_series(0, 9) AS i"
                )
            )
        migrate(url)
        with scratch.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(heartbeats)) == 10
            days = conn.scalars(text("SELECT count(DISTINCT tableoid) FROM heartbeats")).one()
            have = partitions.existing(conn)
        assert days == 10
        assert len(have) >= 10 + 3
        # And back: every row kept, in one table again.
        command.downgrade(alembic_config(url), "0003")
        with scratch.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM heartbeats")) == 10
            assert conn.scalar(text("SELECT to_regclass('heartbeats_partitioned')")) is None
    finally:
        scratch.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
