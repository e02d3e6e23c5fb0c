"""Liveness stays cheap at 100,000 devices: the sweep reads only expired devices (the plan of
the very statement the sweeper runs uses the partial index, never a scan of the fleet) and the
fleet view answers from `devices` alone.
Their times are printed, not asserted: timings belong to benchmarks. Runs on a database of its
own on the test stack's server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from support import plan_of, statements_run_by

from gateway.devtools.localstack import LocalStack
from gateway.storage import liveness, reads, views
from gateway.storage.engine import make_engine, migrate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = 100_000
EXPIRED = 500


@pytest.fixture(scope="module")
def big_fleet(stack: LocalStack) -> Iterator[Engine]:
    admin = make_engine(stack.database_url.rsplit("/", 1)[0] + "/postgres")
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DROP DATABASE IF EXISTS gateway_scale WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE gateway_scale"))
    url = stack.database_url.rsplit("/", 1)[0] + "/gateway_scale"
    migrate(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        # 100,000 devices: most online with a deadline ahead, some offline, a few never seen.
        conn.execute(
            text(
                """
                INSERT INTO devices (device_id, heartbeat_interval_s, last_seen, status,
                                     status_changed_at, status_reason, offline_deadline)
                SELECT 'scale-' || i, 30, now() - interval '5 s',
                       CASE WHEN i % 10 = 0 THEN 'offline' WHEN i % 50 = 1 THEN 'never_seen'
                            ELSE 'online' END,
                       now() - (i % 3600) * interval '1 s', 'heartbeat',
                       now() + interval '1 hour'
                FROM generate_series(1, :n) AS i
                """
            ),
            {"n": FLEET},
        )
        conn.execute(text("ANALYZE devices"))
    yield engine
    engine.dispose()
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DROP DATABASE IF EXISTS gateway_scale WITH (FORCE)"))
    admin.dispose()


def timed(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def test_the_sweep_reads_only_expired_devices(big_fleet: Engine) -> None:
    """The plan of the sweeper's own statement, with nothing expired and with 500 expired among
    100,000: the partial index finds the expired, the primary key their rows; no scan of the
    fleet."""
    for expired in (0, EXPIRED):
        if expired:
            with big_fleet.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE devices SET offline_deadline = now() - interval '1 s' "
                        "WHERE device_id IN "
                        "(SELECT device_id FROM devices WHERE status = 'online' LIMIT :n)"
                    ),
                    {"n": expired},
                )
                conn.execute(text("ANALYZE devices"))
        statements = statements_run_by(big_fleet, liveness.sweep)
        assert statements, "the sweep ran no statement"
        statement, parameters = statements[0]
        assert "UPDATE devices" in statement, statement
        plan = plan_of(big_fleet, statement, parameters)
        assert "ix_devices_online_deadline" in plan, plan
        assert "devices_pkey" in plan, plan
        assert "Seq Scan" not in plan, plan

    def sweep_nothing() -> None:
        with big_fleet.begin() as conn:
            assert liveness.sweep(conn) == ([], [])

    started = time.perf_counter()
    with big_fleet.begin() as conn:
        states, events = liveness.sweep(conn)
    busy = time.perf_counter() - started
    assert len(states) == len(events) == EXPIRED
    idle = timed(sweep_nothing)
    print(
        f"\nsweep over {FLEET} devices: idle {idle * 1000:.1f} ms, {EXPIRED} expired "
        f"{busy * 1000:.1f} ms"
    )


def test_the_fleet_view_at_100k(big_fleet: Engine) -> None:
    def fleet() -> views.Fleet:
        with big_fleet.connect() as conn:
            return reads.fleet_counts(conn)

    result = fleet()
    assert result.total >= FLEET
    assert result.online + result.offline + result.never_seen == result.total
    assert len(result.recently_offline) == 10
    elapsed = timed(fleet)
    print(f"\nfleet view over {result.total} devices: {elapsed * 1000:.1f} ms")
