"""The bridge against a real RabbitMQ: valid, invalid, redelivered, and broker refusals.

Messages enter `amq.topic` exactly as RabbitMQ's MQTT plugin publishes them (routing key
`devices.<id>.<kind>`, persistent, `x-mqtt-publish-qos` header), in a vhost of the test's own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable

import aio_pika
import pytest
from inprocess import bridge_for, declared, depth, publish_as_mqtt, take
from support import apoll, serving, unique

from bridge.service import Bridge
from gateway.amqp import topology
from gateway.amqp.publisher import ITEMS_HEADER
from gateway.contract.messages import MESSAGE_NAMESPACE, Rejection, decode_work
from gateway.runtime import metrics
from gateway.runtime.settings import BridgeSettings

pytestmark = pytest.mark.integration


def test_valid_heartbeat_becomes_one_canonical_message(vhost: str) -> None:
    device = unique()

    async def scenario() -> None:
        async with declared(vhost) as (_, channel), serving(bridge_for(vhost)):
            body = b'{"seq": 7, "msg_id": "m-7", "cpu": 12.5, "ts": "2026-11-29T10:00:00Z"}'
            await publish_as_mqtt(channel, f"devices.{device}.heartbeat", body)
            message = await take(channel, topology.WORK_QUEUE)
            (hb,) = decode_work(message.body)
            assert hb.kind == "heartbeat"
            assert (hb.device_id, hb.seq, hb.msg_id, hb.metrics) == (
                device,
                7,
                "m-7",
                {"cpu": 12.5},
            )
            assert hb.source == "mqtt"
            assert hb.id == uuid.uuid5(MESSAGE_NAMESPACE, f"{device}/m-7")
            assert message.message_id == str(hb.id)
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            await apoll(
                lambda: _zero(depth(channel, topology.MQTT_INBOX_QUEUE)), what="inbox acked"
            )

    asyncio.run(scenario())


def test_heartbeats_arriving_together_cross_the_broker_as_one_message(vhost: str) -> None:
    """A burst is forwarded as one work message carrying every heartbeat; each inbox message
    is acked once the broker confirmed that message."""
    device = unique()

    async def scenario() -> None:
        async with declared(vhost) as (_, channel):
            for seq in range(30):
                await publish_as_mqtt(
                    channel, f"devices.{device}.heartbeat", f'{{"seq": {seq}}}'.encode()
                )
            settings = BridgeSettings(
                amqp_url=vhost, bridge_health_port=0, bridge_batch_size=10, bridge_linger_ms=50
            )
            async with serving(Bridge(settings)):
                seqs, sizes = [], []
                while len(seqs) < 30:
                    message = await take(channel, topology.WORK_QUEUE)
                    items = decode_work(message.body)
                    sizes.append(message.headers.get(ITEMS_HEADER, 1))
                    assert sizes[-1] == len(items)
                    seqs += [item.seq for item in items]
                await apoll(
                    lambda: _zero(depth(channel, topology.MQTT_INBOX_QUEUE)), what="inbox acked"
                )
            assert sorted(seqs) == list(range(30))
            assert max(sizes) == 10 and len(sizes) <= 6, sizes

    asyncio.run(scenario())


def test_invalid_input_is_dead_lettered_and_the_flow_goes_on(vhost: str) -> None:
    device = unique()

    async def scenario() -> None:
        async with declared(vhost) as (_, channel), serving(bridge_for(vhost)):
            await publish_as_mqtt(channel, f"devices.{device}.heartbeat", b"{not json")
            await publish_as_mqtt(channel, f"devices.{device}.telemetry", b"{}")
            await publish_as_mqtt(channel, f"devices.{device}.heartbeat", b'{"seq": 1}')
            reasons = {}
            for _ in range(2):
                dead = await take(channel, topology.REJECTED_QUEUE)
                rejection = Rejection.from_amqp(dict(dead.headers), dead.body)
                reasons[rejection.reason.value] = rejection
            assert set(reasons) == {"not_json", "unknown_topic"}
            assert reasons["not_json"].payload == b"{not json"
            assert reasons["not_json"].topic == f"devices/{device}/heartbeat"
            assert reasons["not_json"].device_id == device
            assert "telemetry" in reasons["unknown_topic"].detail
            (good,) = decode_work((await take(channel, topology.WORK_QUEUE)).body)
            assert (good.device_id, good.seq) == (device, 1)

    asyncio.run(scenario())


def test_redelivered_message_keeps_its_identity(vhost: str) -> None:
    """A message the bridge took but never acked (it died) comes back and is forwarded with
    the same id, so the worker stores it once."""
    device = unique()

    async def scenario() -> None:
        async with declared(vhost) as (conn, channel):
            body = b'{"msg_id": "once", "seq": 1}'
            await publish_as_mqtt(channel, f"devices.{device}.heartbeat", body)
            # A consumer that dies before acking: the broker requeues its message.
            doomed = await conn.channel()
            inbox = await doomed.get_queue(topology.MQTT_INBOX_QUEUE)
            taken = await apoll(lambda: inbox.get(no_ack=False, fail=False), what="inbox message")
            assert not taken.redelivered
            await doomed.close()
            async with serving(bridge_for(vhost)):
                (first,) = decode_work((await take(channel, topology.WORK_QUEUE)).body)
            # The same device retry (QoS 1 DUP) through the bridge again: same id.
            await publish_as_mqtt(channel, f"devices.{device}.heartbeat", body)
            async with serving(bridge_for(vhost)):
                (second,) = decode_work((await take(channel, topology.WORK_QUEUE)).body)
            assert first.id == second.id == uuid.uuid5(MESSAGE_NAMESPACE, f"{device}/once")

    asyncio.run(scenario())


def test_nothing_is_acked_that_the_broker_did_not_confirm(vhost: str) -> None:
    """With the work queue unbound the broker returns the message: the bridge must keep the
    inbox message and forward it once the route is back."""
    device = unique()

    async def scenario() -> None:
        async with declared(vhost) as (_, channel):
            work = await channel.get_queue(topology.WORK_QUEUE)
            async with serving(bridge_for(vhost)):
                await work.unbind(topology.WORK_EXCHANGE, "#")  # after the bridge declared it
                before = _failures()
                await publish_as_mqtt(channel, f"devices.{device}.heartbeat", b'{"seq": 9}')
                await apoll(lambda: _failures() > before, what="the broker to refuse the forward")
            # The bridge is gone; whatever it held unacked is back in the inbox.
            assert await depth(channel, topology.MQTT_INBOX_QUEUE) == 1
            assert await depth(channel, topology.WORK_QUEUE) == 0
            await work.bind(topology.WORK_EXCHANGE, "#")
            async with serving(bridge_for(vhost)):
                (forwarded,) = decode_work((await take(channel, topology.WORK_QUEUE)).body)
                assert (forwarded.device_id, forwarded.seq) == (device, 9)

    asyncio.run(scenario())


def _failures() -> float:
    return metrics.PUBLISH_FAILURES.labels("bridge")._value.get()


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0
