"""The trust boundary against real RabbitMQ and PostgreSQL: whatever reaches the bridge's inbox,
the work queue or the dead-letter queue becomes a stored message or a dead letter, and the
service goes on serving. Hostile bytes go where a device or a broken peer could put them:
routing keys, header names and values that are not UTF-8 (the test's own encoder sends raw
bytes), headers of every type, bodies that are not canonical messages.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pamqp.common
import pamqp.encode
import pytest
from hostile import (
    SESSION_ZONES,
    corpus,
    corpus_bytes,
    corpus_headers,
    dead_letter_headers,
    payloads,
    valid_dead_letter_headers,
    valid_payloads,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from inprocess import (
    beat,
    bridge_for,
    count_rows,
    declared,
    open_publisher,
    publish_as_mqtt,
    take,
    worker_for,
)
from sqlalchemy import Engine, select, text
from support import apoll, assert_stored_as_sent, serving, unique

from gateway.amqp import topology
from gateway.amqp.publisher import ITEMS_HEADER
from gateway.contract.conversion import Forward, convert
from gateway.contract.messages import Rejection, encode_work, read_dead_letter
from gateway.contract.payload import TS_MAX, TS_MIN
from gateway.storage import writes
from gateway.storage.schema import rejected

pytestmark = pytest.mark.integration


@pytest.fixture
def raw_strings(monkeypatch) -> Iterator[None]:
    """Let this process send AMQP strings that are not UTF-8: text with surrogate escapes
    (`"\\udcff"`) goes out as the raw bytes it stands for, in routing keys, header names and
    header values, as any AMQP client that is not Python's could send them."""

    def raw_string(encoder: struct.Struct, value: str) -> bytes:
        data = value.encode("utf-8", "surrogateescape")
        return encoder.pack(len(data)) + data

    def raw_table(value: dict[str, Any]) -> bytes:
        parts = [
            raw_string(pamqp.common.Struct.byte, k) + pamqp.encode.encode_table_value(v)
            for k, v in sorted(value.items())
        ]
        data = b"".join(parts)
        return pamqp.common.Struct.integer.pack(len(data)) + data

    monkeypatch.setattr(pamqp.encode, "_string", raw_string)
    monkeypatch.setattr(pamqp.encode, "field_table", raw_table)
    monkeypatch.setitem(pamqp.encode.METHODS, "table", raw_table)
    yield


def rejected_with(engine: Engine, marker: str, since: datetime, payloads: list[bytes]) -> list:
    """Dead letters whose device or payload holds `marker`, or (for inputs that cannot hold it)
    found on the work queue since `since` with one of these `payloads`."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT * FROM rejected WHERE device_id = :m"
                " OR position(convert_to(:m, 'UTF8') in payload) > 0"
                " OR (source = 'work_queue' AND received_at >= :since AND payload = ANY(:payloads))"
            ),
            {"m": marker, "since": since, "payloads": payloads},
        ).all()


#: Hostile work messages: (body, headers). `{m}` is replaced by the test's marker.
HOSTILE_WORK = [
    (b"[1, {m}]", {}),
    (b'"{m}"', {}),
    (b"{m}", {}),
    (b"\xff\xfe{m}", {}),
    (b'{"kind": "batch", "items": [], "m": "{m}"}', {ITEMS_HEADER: "lots"}),
    (b'{"kind": "heartbeat", "device_id": "{m}", "seq": 1' + b"0" * 30 + b"}", {}),
    (b'{"device_id": "{m}"}', {ITEMS_HEADER: 2**63 - 1}),
    (b'{"device_id": "{m}"}', {ITEMS_HEADER: -7, "\udcff\udcfe": "\udcff"}),
    (b'{"device_id": "{m}"}', {ITEMS_HEADER: 1.5, "x": bytearray(b"\xff")}),
    (b'{"device_id": "{m}"}', {ITEMS_HEADER: None, "y": [1, {"\udcff": None}]}),
    (b"[" * 5000 + b'"{m}"' + b"]" * 5000, {ITEMS_HEADER: True}),
]


def test_the_worker_survives_any_work_message_and_dead_letter(
    vhost: str, stack, engine: Engine, raw_strings: None
) -> None:
    """Bodies that are no canonical message, headers of any type or not UTF-8, dead letters
    whose headers make no dead letter, and every such input of the regression corpus: each one
    is a dead letter, and the good heartbeat sent after them all is stored."""
    marker = unique("hostile")
    device = unique()
    work = [(body.replace(b"{m}", marker.encode()), headers) for body, headers in HOSTILE_WORK]
    # Canonical but for one field: a time outside the range, a metric name PostgreSQL refuses.
    canonical = encode_work(beat(marker, "m-1", datetime.now(UTC), m=1))
    work += [
        (
            canonical.replace(
                b'"received_at":"', b'"received_at":"0001-01-01T00:00:00+01:00","x":"'
            ),
            {},
        ),
        (canonical.replace(b'"m":1', b'"m\\u0000":1'), {}),
    ]
    as_is = [corpus_bytes(e).replace(b"corpus-device", marker.encode()) for e in corpus("work")]
    work += [(body, {}) for body in as_is]
    started = datetime.now(UTC)
    letters = []
    for entry in corpus("dead_letters"):
        headers = corpus_headers(entry, to_send=True) | {"x-gateway-device-id": marker}
        letters.append((corpus_bytes(entry), headers))
    letters += [
        (marker.encode(), {**valid_dead_letter_headers(3), "x-gateway-size": "\udcff"}),
        (marker.encode(), {"x-gateway-reason": "\udcff", "x-gateway-device-id": marker}),
        (marker.encode(), {"x-gateway-\udcff": 1, "x-gateway-received-at": "0001-01-01T00:00Z"}),
    ]

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            channel = await conn.channel()
            await topology.declare(channel)
            to_work = await channel.get_exchange(topology.WORK_EXCHANGE)
            to_dead = await channel.get_exchange(topology.REJECTED_EXCHANGE)
            for body, headers in work:
                await to_work.publish(aio_pika.Message(body, headers=headers), f"work.{marker}")
            for body, headers in letters:
                headers = {**headers, "x-gateway-id": str(uuid.uuid4())}  # each its own entry
                await to_dead.publish(aio_pika.Message(body, headers=headers), "not_json")
            await publisher.publish_work(beat(device, "after-1", datetime.now(UTC)))
            async with serving(worker_for(vhost, stack, worker_linger_ms=100)) as worker:
                await apoll(lambda: count_rows(engine, device) == 1, what="the good heartbeat")
                expected = len(work) + len(letters)
                await apoll(
                    lambda: len(rejected_with(engine, marker, started, as_is)) >= expected,
                    timeout=30,
                    what=f"{expected} dead letters",
                )
                assert all((await worker.ready()).values())

    asyncio.run(scenario())
    dead = rejected_with(engine, marker, started, as_is)
    assert len(dead) == len(work) + len(letters)
    kept = [r for r in dead if r.reason == "not_json"]  # the corpus' dead letters, as they were
    assert {r.detail for r in kept} >= {"\\xff\\xfe", "a\\x00b"}
    reasons = Counter(r.reason for r in dead)
    assert reasons.keys() == {"invalid_message", "not_json", "unstorable"}, reasons
    assert reasons["unstorable"] == 1  # the metric name with NUL, refused by PostgreSQL


def test_the_bridge_survives_a_routing_key_that_is_not_utf8(vhost: str, raw_strings: None):
    """Such a key once closed the bridge's connection on every delivery (the broker brought the
    same message back first after each reconnect): MQTT ingest stopped for every device."""
    device = unique()

    async def scenario() -> None:
        async with declared(vhost) as (_, channel), serving(bridge_for(vhost)):
            for entry in corpus("topics"):
                topic = corpus_bytes(entry, "topic").replace(b"{device}", device.encode())
                key = topic.replace(b"/", b".").decode("utf-8", "surrogateescape")
                await publish_as_mqtt(channel, key, b'{"seq": 0}')
            await publish_as_mqtt(channel, f"devices.{device}.heartbeat", b'{"seq": 1}')
            reasons = []
            for _ in corpus("topics"):
                dead = await take(channel, topology.REJECTED_QUEUE)
                rejection = Rejection.from_amqp(dict(dead.headers), dead.body)
                assert rejection.device_id == device
                reasons.append(rejection.reason.value)
            assert sorted(reasons) == sorted(e["reason"] for e in corpus("topics"))
            forwarded = await take(channel, topology.WORK_QUEUE)
            assert json.loads(forwarded.body)["seq"] == 1

    asyncio.run(scenario())


def test_the_ts_range_reads_back_in_every_session_time_zone(engine: Engine) -> None:
    """Both ends of the ts range are a Python datetime in every time zone PostgreSQL knows,
    which is why the range stops where it does (9999-12-31 is not, ahead of UTC)."""
    with engine.connect() as conn:
        zones = conn.execute(text("SELECT name FROM pg_timezone_names ORDER BY name")).scalars()
        zones = list(zones)
        assert len(zones) > 300
        for zone in zones:
            conn.execute(text("SELECT set_config('TimeZone', :zone, false)"), {"zone": zone})
            low, high = conn.execute(
                text("SELECT CAST(:low AS timestamptz), CAST(:high AS timestamptz)"),
                {"low": TS_MIN, "high": TS_MAX},
            ).one()
            assert (low, high) == (TS_MIN, TS_MAX), zone
        conn.rollback()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=dead_letter_headers, body=...)
def test_any_dead_letter_the_worker_reads_is_stored_and_read_back(
    engine: Engine, headers: dict, body: bytes
) -> None:
    """Whatever headers and body a message on the dead-letter queue has, what the worker makes
    of it goes into PostgreSQL and comes back as it was."""
    rejection = read_dead_letter(headers, body[:300])
    with engine.connect() as conn, conn.begin() as transaction:
        assert writes.write_rejections(conn, [rejection, rejection]).kept <= 1
        row = conn.execute(select(rejected).where(rejected.c.id == rejection.id)).mappings().one()
        transaction.rollback()
    stored = {k: row[k] for k in ("reason", "detail", "source", "device_id", "topic", "size")}
    assert stored == {
        "reason": rejection.reason.value,
        "detail": rejection.detail,
        "source": rejection.source.value,
        "device_id": rejection.device_id,
        "topic": rejection.topic,
        "size": rejection.size,
    }
    assert bytes(row["payload"]) == rejection.payload
    assert row["received_at"] == rejection.received_at


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    body=valid_payloads().map(lambda b: json.dumps(b).encode()) | payloads(),
    zone=st.sampled_from(SESSION_ZONES),
)
def test_any_heartbeat_the_bridge_accepts_is_stored_and_read_back(
    engine: Engine, body: bytes, zone: str
) -> None:
    """Whatever body the conversion lets through, from the extremes of every field's range to
    the hostile ones it accepts, is stored and read back as it was sent, in any session time
    zone: nothing it accepts fails later, in the worker or the api."""
    outcome = convert(f"devices.{unique()}.heartbeat", body)
    assume(isinstance(outcome, Forward))
    sent = outcome.message
    assert_stored_as_sent(engine, sent, zone)
