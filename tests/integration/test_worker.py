"""The worker against real RabbitMQ, PostgreSQL and Redis: batching, idempotency, device state,
bad messages. Each test has its own vhost and device ids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
import redis
from hostile import SESSION_ZONES, in_range_datetimes
from hostile import valid_metric_names as metric_names
from hostile import valid_metric_values as metric_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import beat, count_rows, open_publisher, worker_for
from sqlalchemy import Engine, func, select, text
from support import apoll, assert_stored_as_sent, serving, unique

from gateway.amqp import topology
from gateway.amqp.publisher import ITEMS_HEADER
from gateway.contract.messages import (
    Heartbeat,
    Source,
    StatusReport,
    WorkBatch,
    encode_work,
    utcnow,
)
from gateway.contract.payload import TS_MAX, TS_MIN, HeartbeatPayload
from gateway.storage import mirror, writes
from gateway.storage.schema import devices, heartbeats, rejected
from worker.service import MAX_ATTEMPTS

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


def test_batches_one_transaction_each(vhost: str, stack, engine: Engine) -> None:
    device = unique()
    sent = [beat(device, f"m-{i}", T0 + timedelta(seconds=i), cpu=i) for i in range(50)]

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            for hb in sent:
                await publisher.publish_work(hb)
            async with serving(
                worker_for(vhost, stack, worker_batch_size=20, worker_linger_ms=200)
            ):
                await apoll(lambda: count_rows(engine, device) == 50, what="50 rows")

    asyncio.run(scenario())
    with engine.connect() as conn:
        sizes = conn.execute(
            select(func.count())
            .where(heartbeats.c.device_id == device)
            .group_by(heartbeats.c.stored_at)
        ).scalars()
        sizes = sorted(sizes)
    # stored_at is the transaction's now(): rows that share it were written together.
    assert sum(sizes) == 50 and max(sizes) <= 20, sizes  # never more than a batch
    assert max(sizes) > 1, sizes  # the 50 queued ones were batched, not one commit each


def test_redelivery_and_repeated_msg_id_are_stored_once(vhost: str, stack, engine: Engine) -> None:
    device = unique()
    original = beat(device, "m-1", T0, cpu=1.0)
    # The device retried: same msg_id, received later, other values: still the same heartbeat.
    retried = beat(device, "m-1", T0 + timedelta(seconds=5), cpu=2.0)
    later = beat(device, "m-2", T0 + timedelta(seconds=10), cpu=3.0)
    # Stored after whatever was queued before it (one consumer, in order): once it is there,
    # nothing published earlier is still on its way. Received earlier than `later`, it must not
    # move the device's state back.
    marker = beat(device, "m-3", T0 + timedelta(seconds=7), cpu=9.0)

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            async with serving(worker_for(vhost, stack)):
                for hb in (original, original, retried, original, later):
                    await publisher.publish_work(hb)
                await apoll(lambda: count_rows(engine, device) == 2, what="2 rows")
                # A redelivery after everything was stored changes nothing either.
                await publisher.publish_work(original)
                await publisher.publish_work(marker)
                await apoll(lambda: count_rows(engine, device) == 3, what="the marker stored")

    asyncio.run(scenario())
    with engine.connect() as conn:
        rows = conn.execute(
            select(heartbeats.c.msg_id, heartbeats.c.metrics).where(
                heartbeats.c.device_id == device
            )
        ).all()
        dev = conn.execute(select(devices).where(devices.c.device_id == device)).mappings().one()
    assert sorted(r.msg_id for r in rows if r.msg_id != marker.msg_id) == ["m-1", "m-2"]
    assert {r.msg_id: r.metrics for r in rows}["m-1"] == {"cpu": 1.0}  # the first one stands
    assert dev["last_seen"] == later.received_at


def test_device_state_moves_forward_and_is_mirrored(
    vhost: str, stack, engine: Engine, redis_client: redis.Redis
) -> None:
    device = unique()
    # Received moments ago: a deadline already past would let the sweeper turn the device
    # offline (reason timeout) before its own status report arrives.
    start = utcnow() - timedelta(seconds=10)
    beats = [
        beat(device, f"m-{i}", start + timedelta(seconds=i), cpu=float(i)) for i in range(1, 4)
    ]

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            async with serving(worker_for(vhost, stack, worker_batch_size=1)):
                # Out of order, one batch each: state must still end at the newest.
                for hb in (beats[2], beats[0], beats[1]):
                    await publisher.publish_work(hb)
                await apoll(lambda: count_rows(engine, device) == 3, what="3 rows")
                await publisher.publish_work(
                    StatusReport(device_id=device, status="offline", source=Source.MQTT)
                )
                await apoll(
                    lambda: (mirror.read(redis_client, device) or _none()).status == "offline",
                    what="status report mirrored",
                )

    asyncio.run(scenario())
    with engine.connect() as conn:
        row = conn.execute(select(devices).where(devices.c.device_id == device)).mappings().one()
    assert row["first_seen"] == beats[0].received_at
    assert row["last_seen"] == beats[2].received_at
    assert row["last_metrics"] == {"cpu": 3.0}
    assert row["last_seq"] == 3
    assert (row["status"], row["status_reason"]) == ("offline", "last_will")
    cached = mirror.read(redis_client, device)
    assert cached is not None
    assert cached.version == row["version"]
    assert cached.last_seen == row["last_seen"]
    assert cached.last_metrics == {"cpu": 3.0}
    assert cached.status_at(beats[2].received_at) == "offline"  # its own word


def test_bad_messages_are_dead_lettered_without_blocking(vhost: str, stack, engine: Engine) -> None:
    device = unique()
    good = beat(device, "m-1", T0, cpu=1.0)
    poison = beat(device, "m-2", T0, cpu=2.0)
    after = beat(device, "m-3", T0 + timedelta(seconds=1), cpu=3.0)
    # A constraint the worker does not expect refuses one message: it must cost one dead
    # letter, not a crash, a retry loop or a blocked queue.
    constraint = f"test_refuse_{device.replace('-', '_')}"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"ALTER TABLE heartbeats ADD CONSTRAINT {constraint} "
                f"CHECK (NOT (device_id = '{device}' AND msg_id = 'm-2')) NOT VALID"
            )
        )

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            channel = await conn.channel()
            exchange = await channel.get_exchange(topology.WORK_EXCHANGE)
            malformed = json.dumps({"kind": "heartbeat", "device_id": device}).encode()
            await exchange.publish(aio_pika.Message(malformed), topology.work_routing_key(device))
            for hb in (good, poison, after):
                await publisher.publish_work(hb)
            async with serving(worker_for(vhost, stack, worker_linger_ms=300)):
                await apoll(lambda: count_rows(engine, device) == 2, what="the 2 good rows")
                await apoll(lambda: len(_rejected(engine, device)) == 2, what="2 dead letters")

    try:
        asyncio.run(scenario())
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE heartbeats DROP CONSTRAINT {constraint}"))
    dead = {r.reason: r for r in _rejected(engine, device)}
    assert set(dead) == {"invalid_message", "unstorable"}
    assert "msg_id: Field required" in dead["invalid_message"].detail
    assert constraint in dead["unstorable"].detail
    assert json.loads(dead["unstorable"].payload)["msg_id"] == "m-2"


def _rejected(engine: Engine, device: str) -> list:
    with engine.connect() as conn:
        rows = conn.execute(select(rejected).where(rejected.c.device_id == device)).all()
    return rows


class _none:
    status = None


def test_a_heartbeat_and_a_last_will_in_one_batch_are_two_events(engine: Engine) -> None:
    device = unique()
    hb = beat(device, "m-1", T0)
    will = StatusReport(
        device_id=device,
        status="offline",
        source=Source.MQTT,
        received_at=T0 + timedelta(seconds=1),
    )
    with engine.begin() as conn:
        result = writes.write_batch(conn, [hb], [will])
    assert [(e.from_status, e.to_status, e.reason) for e in result.events] == [
        ("never_seen", "online", "heartbeat"),
        ("online", "offline", "last_will"),
    ]
    # Replaying the batch (a redelivery) changes nothing and records nothing.
    with engine.begin() as conn:
        assert writes.write_batch(conn, [hb], [will]).events == []


def test_a_batch_message_is_stored_item_by_item(vhost: str, stack, engine: Engine) -> None:
    """A work message carrying several heartbeats (as the bridge and the api send them): every
    item stored once, a repeated batch changes nothing."""
    device = unique()
    items = [beat(device, f"b-{i}", T0 + timedelta(seconds=i), cpu=i) for i in range(40)]
    batch = WorkBatch(items=items)

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            await publisher.publish_work(batch)
            await publisher.publish_work(batch)  # a redelivery, or a retried publish
            await publisher.publish_work(beat(device, "single-40", T0 + timedelta(seconds=40)))
            async with serving(worker_for(vhost, stack, worker_batch_size=50)):
                await apoll(lambda: count_rows(engine, device) == 41, what="41 rows")
            # The worker is gone: a message it had not acked would be back in the queue.
            channel = await conn.channel()
            work = await channel.declare_queue(topology.WORK_QUEUE, durable=True, passive=True)
            assert work.declaration_result.message_count == 0

    asyncio.run(scenario())
    assert count_rows(engine, device) == 41


@contextlib.contextmanager
def refused_by_the_database(engine: Engine, device: str, msg_id: str) -> Iterator[Callable]:
    """A trigger that makes PostgreSQL refuse one heartbeat (a check violation, as a constraint
    the worker does not expect would) and counts every attempt to insert it, in a sequence:
    its count survives the rollback of the transaction that tried. Yields the count."""
    name = f"test_refuse_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SEQUENCE {name}"))
        conn.execute(
            text(
                f"""
                CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF NEW.device_id = '{device}' AND NEW.msg_id = '{msg_id}' THEN
                    PERFORM nextval('{name}');
                    RAISE EXCEPTION 'refused by {name}' USING ERRCODE = 'check_violation';
                  END IF;
                  RETURN NEW;
                END $$
                """
            )
        )
        conn.execute(
            text(
                f"CREATE TRIGGER {name} BEFORE INSERT ON heartbeats "
                f"FOR EACH ROW EXECUTE FUNCTION {name}()"
            )
        )

    def attempts() -> int:
        with engine.connect() as conn:
            called = conn.scalar(text(f"SELECT is_called FROM {name}"))
            return conn.scalar(text(f"SELECT last_value FROM {name}")) if called else 0

    try:
        yield attempts
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TRIGGER {name} ON heartbeats"))
            conn.execute(text(f"DROP FUNCTION {name}()"))
            conn.execute(text(f"DROP SEQUENCE {name}"))


def test_a_message_the_database_refuses_is_retried_three_times_then_dead_lettered(
    vhost: str, stack, engine: Engine
) -> None:
    """Tried in its batch, then alone `MAX_ATTEMPTS` (3) times: four attempts, counted by the
    database itself; then one dead letter `unstorable` with the database's words, the message
    acked, and the messages behind it stored."""
    device = unique()
    poison = beat(device, "m-1", T0, cpu=1.0)
    behind = [beat(device, f"m-{i}", T0 + timedelta(seconds=i), cpu=i) for i in range(2, 6)]

    async def scenario(attempts: Callable[[], int]) -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            for hb in (poison, *behind):
                await publisher.publish_work(hb)
            async with serving(worker_for(vhost, stack, worker_linger_ms=200)):
                await apoll(lambda: _rejected(engine, device), what="the dead letter")
                await apoll(lambda: count_rows(engine, device) == 4, what="the 4 behind it")
            assert attempts() == 1 + MAX_ATTEMPTS
            channel = await conn.channel()
            work = await channel.declare_queue(topology.WORK_QUEUE, durable=True, passive=True)
            assert work.declaration_result.message_count == 0  # acked, not requeued

    with refused_by_the_database(engine, device, poison.msg_id) as attempts:
        asyncio.run(scenario(attempts))
    assert MAX_ATTEMPTS == 3  # what the documentation says
    (dead,) = _rejected(engine, device)
    assert dead.reason == "unstorable"
    assert dead.detail.startswith("refused 3 times by the database: ")
    assert "refused by test_refuse_" in dead.detail
    assert json.loads(dead.payload)["msg_id"] == "m-1"


def test_a_bad_item_in_a_work_message_is_dead_lettered_alone(
    vhost: str, stack, engine: Engine
) -> None:
    """One work message carrying six items, as the bridge and the api send them: one that is
    not a canonical message, one the database refuses. Each is a dead letter of its own; the
    four others, of four devices, are stored; the message is acked once."""
    devices_ = [unique() for _ in range(4)]
    good = [beat(d, f"g-{i}", T0 + timedelta(seconds=i), cpu=i) for i, d in enumerate(devices_)]
    refused = beat(devices_[0], "refused-1", T0, cpu=9.0)
    body = json.loads(encode_work(WorkBatch(items=[good[0], refused, *good[1:]])))
    not_canonical = {"kind": "heartbeat", "device_id": devices_[1], "msg_id": "no-id"}
    body["items"].insert(2, not_canonical)

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            channel = await conn.channel()
            await topology.declare(channel)
            exchange = await channel.get_exchange(topology.WORK_EXCHANGE)
            await exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), headers={ITEMS_HEADER: 6}),
                topology.BATCH_ROUTING_KEY,
            )
            async with serving(worker_for(vhost, stack)):
                await apoll(
                    lambda: sum(count_rows(engine, d) for d in devices_) == 4, what="4 rows"
                )
                await apoll(
                    lambda: (
                        len(_rejected(engine, devices_[0]) + _rejected(engine, devices_[1])) == 2
                    ),
                    what="2 dead letters",
                )
            work = await channel.declare_queue(topology.WORK_QUEUE, durable=True, passive=True)
            assert work.declaration_result.message_count == 0

    with refused_by_the_database(engine, refused.device_id, refused.msg_id):
        asyncio.run(scenario())
    assert [count_rows(engine, d) for d in devices_] == [1, 1, 1, 1]
    dead = {r.reason: r for r in _rejected(engine, devices_[0]) + _rejected(engine, devices_[1])}
    assert set(dead) == {"invalid_message", "unstorable"}
    assert json.loads(dead["unstorable"].payload)["msg_id"] == "refused-1"
    assert dead["unstorable"].device_id == devices_[0]
    assert json.loads(dead["invalid_message"].payload) == not_canonical
    assert dead["invalid_message"].device_id == devices_[1]
    with engine.connect() as conn:
        seen = conn.execute(
            select(devices.c.device_id, devices.c.last_seen).where(
                devices.c.device_id.in_(devices_)
            )
        ).all()
    assert {d: at for d, at in seen} == {b.device_id: b.received_at for b in good}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    ts=st.none() | in_range_datetimes | st.sampled_from([TS_MIN, TS_MAX]),
    msg_id=st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True),
    metrics=st.dictionaries(metric_names, metric_values, max_size=20),
    zone=st.sampled_from(SESSION_ZONES),
)
def test_what_is_stored_reads_back_as_sent(engine: Engine, seq, ts, msg_id, metrics, zone) -> None:
    """Any heartbeat the parser accepts (ts anywhere in its range, in any zone) is stored and
    read back unchanged, in any session time zone."""
    body = {"seq": seq, "ts": ts and ts.isoformat(), "msg_id": msg_id, "metrics": metrics}
    sent = Heartbeat.from_payload(unique(), HeartbeatPayload.model_validate(body), Source.HTTP)
    assert_stored_as_sent(engine, sent, zone)


def test_the_worker_logs_a_summary_not_every_batch(stack, caplog) -> None:
    worker = worker_for("amqp://unused/", stack)
    worker._written.add(stored=480, duplicates=20, rejected=1, seconds=0.25)
    worker._written.add(stored=12, duplicates=0, rejected=0, seconds=0.01)
    with caplog.at_level(logging.INFO, logger="worker.service"):
        worker.summarize()
        worker.summarize()  # nothing written since: nothing to say
    worker.engine.dispose()
    assert [r.getMessage() for r in caplog.records if r.name == "worker.service"] == [
        "last 0 s: 2 batches, 492 stored, 20 duplicates, 1 rejected; slowest batch 250 ms"
    ]
