"""An exception nobody foresaw, injected at each boundary (the bridge's conversion and forward,
the api's ingest on both its paths, the worker's decoding): it becomes a dead letter with the
reason `unexpected_error` and the exception's class and message in its detail; the message is
acked (over HTTP: a 422, not a 500), and every other device's messages keep flowing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import aio_pika
import httpx
import pytest
from inprocess import (
    beat,
    bridge_for,
    count_rows,
    declared,
    depth,
    open_publisher,
    publish_as_mqtt,
    take,
    worker_for,
)
from sqlalchemy import Engine, select
from support import Device, apoll, history, poll, serving, unique
from test_ingest_paths import Api, inproc  # noqa: F401 (a fixture)

from gateway.amqp import topology
from gateway.amqp.publisher import Forwarder
from gateway.contract import conversion as conversion
from gateway.contract import messages
from gateway.contract.messages import Heartbeat, Rejection, decode_work
from gateway.contract.payload import HeartbeatPayload
from gateway.storage.schema import rejected

BOOM = OverflowError("date value out of range")


@pytest.fixture
def failing_parse(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The payload parser raises what it never should, for bodies that hold `boom`."""
    parse = conversion.parse_payload

    def parse_or_fail(raw: bytes) -> HeartbeatPayload:
        if b"boom" in raw:
            raise BOOM
        return parse(raw)

    monkeypatch.setattr(conversion, "parse_payload", parse_or_fail)
    yield


def _zero(count) -> object:
    async def check() -> bool:
        return await count == 0

    return check()


@pytest.mark.integration
def test_the_bridge_dead_letters_what_its_conversion_did_not_foresee(
    vhost: str, failing_parse: None
) -> None:
    bad, good = unique(), unique()

    async def scenario() -> None:
        async with declared(vhost) as (_, channel), serving(bridge_for(vhost)):
            await publish_as_mqtt(channel, f"devices.{bad}.heartbeat", b'{"boom": 1}')
            await publish_as_mqtt(channel, f"devices.{good}.heartbeat", b'{"seq": 1}')
            dead = await take(channel, topology.REJECTED_QUEUE)
            rejection = Rejection.from_amqp(dict(dead.headers), dead.body)
            assert (rejection.reason, rejection.device_id) == ("unexpected_error", bad)
            assert rejection.detail == "OverflowError: date value out of range"
            assert rejection.payload == b'{"boom": 1}'
            (forwarded,) = decode_work((await take(channel, topology.WORK_QUEUE)).body)
            assert forwarded.device_id == good
            await apoll(lambda: _zero(depth(channel, topology.MQTT_INBOX_QUEUE)), what="acked")

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_message_the_broker_cannot_be_sent_fails_alone(
    vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A canonical message that cannot be encoded (a bug, never seen) shares a batch with other
    devices' heartbeats: only it fails, and it becomes a dead letter instead of coming back
    for ever; the others are forwarded."""
    poisoned_device, others = unique(), [unique() for _ in range(5)]
    convert = conversion.convert

    def convert_or_poison(routing_key: str, body: bytes, received_at=None):
        outcome = convert(routing_key, body, received_at)
        if poisoned_device in routing_key and isinstance(outcome, conversion.Forward):
            # A metric no JSON encoder takes, past validation as only a bug could put it.
            beat = outcome.message.model_copy(update={"metrics": {"m": {1, 2}}})
            return conversion.Forward(beat)
        return outcome

    monkeypatch.setattr("bridge.service.convert", convert_or_poison)

    async def scenario() -> None:
        async with declared(vhost) as (_, channel):
            await publish_as_mqtt(channel, f"devices.{poisoned_device}.heartbeat", b"{}")
            for device in others:
                await publish_as_mqtt(channel, f"devices.{device}.heartbeat", b"{}")
            async with serving(bridge_for(vhost)):
                dead = await take(channel, topology.REJECTED_QUEUE)
                rejection = Rejection.from_amqp(dict(dead.headers), dead.body)
                assert rejection.reason == "unexpected_error"
                assert rejection.device_id == poisoned_device
                assert rejection.detail.startswith("TypeError: ")
                forwarded: list[Heartbeat] = []
                while len(forwarded) < len(others):
                    forwarded += decode_work((await take(channel, topology.WORK_QUEUE)).body)
                assert sorted(m.device_id for m in forwarded) == sorted(others)
                await apoll(
                    lambda: _zero(depth(channel, topology.MQTT_INBOX_QUEUE)), what="all acked"
                )

    asyncio.run(scenario())


@pytest.mark.integration
def test_the_worker_dead_letters_what_its_decoding_did_not_foresee(
    vhost: str, stack, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad, good = unique(), unique()
    decode = messages.decode_work

    def decode_or_fail(body: bytes):
        if bad.encode() in body:
            raise RecursionError("maximum recursion depth exceeded")
        return decode(body)

    monkeypatch.setattr(messages, "decode_work", decode_or_fail)

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await open_publisher(conn)
            await publisher.publish_work(beat(bad, "m-1", datetime.now(UTC)))
            await publisher.publish_work(beat(good, "m-1", datetime.now(UTC)))
            async with serving(worker_for(vhost, stack, worker_linger_ms=50)) as worker:
                await apoll(lambda: count_rows(engine, good) == 1, what="the good heartbeat")
                await apoll(lambda: _dead_letters(engine, bad), what="the dead letter")
                assert all((await worker.ready()).values())

    asyncio.run(scenario())
    (dead,) = _dead_letters(engine, bad)
    assert dead.reason == "unexpected_error"
    assert dead.detail == "RecursionError: maximum recursion depth exceeded"
    assert json.loads(dead.payload)["device_id"] == bad
    assert count_rows(engine, bad) == 0


def _dead_letters(engine: Engine, device: str) -> list:
    with engine.connect() as conn:
        return conn.execute(select(rejected).where(rejected.c.device_id == device)).all()


@pytest.mark.e2e
def test_the_api_answers_422_and_dead_letters_what_it_did_not_foresee(
    inproc: Api,  # noqa: F811
    api: httpx.Client,
    register,
    failing_parse: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On both paths (the route for a first request, FastIngest once the token is known), in
    the parse and in the forward (the broker is there, yet the message cannot be sent)."""
    device: Device = register()
    forward = Forwarder.forward

    async def forward_or_fail(self: Forwarder, item: Heartbeat) -> None:
        if item.msg_id == "unsendable":
            raise TypeError("Type is not JSON serializable: set")
        await forward(self, item)

    monkeypatch.setattr(Forwarder, "forward", forward_or_fail)
    answers = [
        inproc.beat(device, body)
        for body in (b'{"boom": 1}', b'{"boom": 2}', b'{"msg_id": "unsendable"}')
    ]
    assert len(inproc.routed) == 1  # the others went by the short path
    assert [(r.status_code, r.json()["detail"]) for r in answers] == [
        (422, "OverflowError: date value out of range"),
        (422, "OverflowError: date value out of range"),
        (422, "TypeError: Type is not JSON serializable: set"),
    ]
    assert inproc.beat(device, b'{"msg_id": "fine"}').status_code == 202

    def dead_letters() -> list[dict]:
        params = {"device_id": device.device_id}
        items = api.get("/api/v1/rejected", params=params).json()["items"]
        return items if len(items) == 3 else []

    dead = poll(dead_letters, what="three dead letters")
    assert sorted((d["reason"], d["payload"]) for d in dead) == [
        ("unexpected_error", '{"boom": 1}'),
        ("unexpected_error", '{"boom": 2}'),
        ("unexpected_error", '{"msg_id": "unsendable"}'),
    ]
    stored = poll(lambda: history(api, device.device_id), what="the good heartbeat stored")
    assert [h["msg_id"] for h in stored] == ["fine"]
