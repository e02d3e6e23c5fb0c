"""The Redis mirror of device state against real Redis and PostgreSQL: writes are versioned (a
late writer never overwrites newer state, a rebuild never undoes a live write), and the stack's
worker rebuilds the whole mirror from PostgreSQL when Redis comes back empty, for every device,
including those that have not written since."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import Engine, select
from support import poll, unique

from gateway.contract.messages import Heartbeat, Source, utcnow
from gateway.contract.payload import HeartbeatPayload
from gateway.devtools.localstack import LocalStack
from gateway.storage import mirror, writes
from gateway.storage.schema import devices


def beat(device: str, msg_id: str, cpu: float) -> Heartbeat:
    payload = HeartbeatPayload(msg_id=msg_id, metrics={"cpu": cpu})
    return Heartbeat.from_payload(device, payload, Source.MQTT)


def write(engine: Engine, hb: Heartbeat) -> mirror.DeviceState:
    with engine.begin() as conn:
        (written,) = writes.write_batch(conn, [hb]).states
    return written


@pytest.fixture
def mirror_client(stack: LocalStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.mark.integration
def test_a_late_writer_never_overwrites_newer_state(
    engine: Engine, mirror_client: redis.Redis
) -> None:
    """Two committed writes of one device, mirrored in the wrong order (the first writer was
    slow): Redis keeps the newer. The same holds once Redis has lost its script (a restart)."""
    device = unique()
    older = write(engine, beat(device, "m-1", 1.0))
    newer = write(engine, beat(device, "m-2", 2.0))
    assert newer.version > older.version  # versions come from PostgreSQL, one per write
    assert mirror.mirror(mirror_client, [newer]) == 1
    mirror.mirror(mirror_client, [older])
    assert mirror.read(mirror_client, device) == newer
    mirror.mirror(mirror_client, [newer.model_copy(update={"last_metrics": {"cpu": 9.0}})])
    assert mirror.read(mirror_client, device) == newer  # the same version: the first one stands
    mirror_client.script_flush()
    mirror.mirror(mirror_client, [older])
    assert mirror.read(mirror_client, device) == newer
    newest = write(engine, beat(device, "m-3", 3.0))
    mirror.mirror(mirror_client, [newest])
    assert mirror.read(mirror_client, device) == newest


@pytest.mark.integration
def test_a_rebuild_never_undoes_a_live_write(engine: Engine, mirror_client: redis.Redis) -> None:
    """A rebuild reads PostgreSQL in pages while batches go on: a page read before a device's
    latest write must not overwrite what that write mirrored meanwhile."""
    device, other = unique(), unique()
    read_early = [write(engine, beat(device, "m-1", 1.0)), write(engine, beat(other, "m-1", 1.0))]
    live = write(engine, beat(device, "m-2", 2.0))
    mirror.mirror(mirror_client, [live])
    assert mirror.rebuild(mirror_client, [read_early]) == 2
    assert mirror.read(mirror_client, device) == live
    assert mirror.read(mirror_client, other) == read_early[1]
    assert mirror.is_rebuilt(mirror_client)


def truth(engine: Engine, device_ids: list[str]) -> dict[str, mirror.DeviceState]:
    with engine.connect() as conn:
        rows = conn.execute(select(devices).where(devices.c.device_id.in_(device_ids))).mappings()
        return {row["device_id"]: mirror.DeviceState.from_row(row) for row in rows}


def mirrored_as(client: redis.Redis, expected: dict[str, mirror.DeviceState]) -> bool:
    try:
        return all(mirror.read(client, d) == s for d, s in expected.items())
    except redis.RedisError:
        return False


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "flush"])
def test_the_mirror_is_rebuilt_when_redis_comes_back_empty(
    apps: LocalStack, engine: Engine, mirror_client: redis.Redis, how: str
) -> None:
    """Devices write, then fall quiet. Redis restarts (it keeps nothing on disk) or is flushed,
    with the worker running all along: every device's state comes back from PostgreSQL, though
    none of them writes again."""
    quiet = [unique("quiet") for _ in range(5)]
    recent = utcnow() - timedelta(seconds=1)
    with engine.begin() as conn:
        writes.write_batch(
            conn,
            [
                Heartbeat.from_payload(
                    d, HeartbeatPayload(msg_id="m-1", metrics={"cpu": 1.0}), Source.HTTP, recent
                )
                for d in quiet
            ],
            default_interval_s=3600,
        )
    expected = truth(engine, quiet)
    mirror.mirror(mirror_client, expected.values())  # as the worker would have after its commit
    assert mirrored_as(mirror_client, expected)
    if how == "restart":
        apps.stop_redis()
        apps.start_redis()
        poll(apps.redis_ready, what="Redis back")
    else:
        mirror_client.flushall()
    assert not any(mirror.read(mirror_client, d) for d in quiet), "Redis kept the mirror"
    poll(
        lambda: mirrored_as(mirror_client, expected),
        timeout=30,
        what="every quiet device's state back in Redis",
    )
    assert truth(engine, quiet) == expected, "the devices wrote meanwhile: the test proves nothing"


def test_a_redis_that_failed_is_not_asked_again_for_a_while(monkeypatch) -> None:
    """The circuit breaker: after a failure, calls are skipped (no wait on a Redis that is
    down) until a cooldown passes, doubling while Redis stays down, up to a cap; a success
    closes it."""
    now = [100.0]
    monkeypatch.setattr("gateway.storage.mirror.time.monotonic", lambda: now[0])
    breaker = mirror.Breaker(cooldown_s=0.5, max_cooldown_s=2.0)
    calls = []

    def down() -> None:
        calls.append("down")
        raise redis.ConnectionError("refused")

    assert breaker.call(down, service="test", skipped="nothing") is None
    assert breaker.call(down, service="test", skipped="nothing") is None  # skipped
    assert calls == ["down"]
    for cooldown in (0.5, 1.0, 2.0, 2.0):
        now[0] += cooldown - 0.01
        assert not breaker.allow()
        now[0] += 0.01
        assert breaker.allow()
        breaker.call(down, service="test", skipped="nothing")
    assert breaker.call(lambda: "up", service="test", skipped="nothing") is None  # still open
    now[0] += 2.0
    assert breaker.call(lambda: "up", service="test", skipped="nothing") == "up"
    assert breaker.allow()
