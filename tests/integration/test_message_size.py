"""Size limits: the broker refuses messages that are too big, and the gateway never sends it one.

RabbitMQ's `max_message_size` (rabbitmq.conf) bounds what any client may publish, a device over
MQTT included. A heartbeat is at most 16 KiB, so a work message carrying many of them could pass
that bound: the Forwarder splits it before it does.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aio_pika
import pytest

from gateway.amqp import topology
from gateway.amqp.publisher import MAX_WORK_MESSAGE_BYTES, Forwarder, Publisher
from gateway.contract.messages import Heartbeat, Source, decode_work, encode_work
from gateway.contract.payload import MAX_METRIC_STRING, MAX_METRICS, HeartbeatPayload

ROOT = Path(__file__).resolve().parents[2]

#: The biggest heartbeat a device can make: every metric a string as long as allowed.
LARGEST = HeartbeatPayload(
    ts="2026-11-29T10:00:00Z",
    seq=2**63 - 1,
    msg_id="m" * 128,
    metrics={f"{'n' * 60}{i:04d}": "é" * MAX_METRIC_STRING for i in range(MAX_METRICS)},
)


def broker_limit() -> int:
    conf = (ROOT / "rabbitmq" / "rabbitmq.conf").read_text()
    return int(re.search(r"^max_message_size = (\d+)$", conf, re.M).group(1))


def test_the_limits_fit_together() -> None:
    """The largest heartbeat fits in a work message, which fits under the broker's limit with
    room for its properties; the broker's limit leaves room for a dead letter's 64 KiB."""
    largest = encode_work(Heartbeat.from_payload("d" * 64, LARGEST, Source.MQTT))
    assert len(largest) < MAX_WORK_MESSAGE_BYTES
    assert broker_limit() >= MAX_WORK_MESSAGE_BYTES + 16 * 1024
    assert broker_limit() >= 64 * 1024 + 16 * 1024


@pytest.mark.integration
def test_a_batch_too_big_for_the_broker_goes_in_parts(vhost: str) -> None:
    async def scenario() -> list[bytes]:
        async with await aio_pika.connect(vhost) as connection:
            publisher = await Publisher.open(connection, timeout=10)
            forwarder = Forwarder(publisher, size=100, linger_s=0.05)
            beats = [
                Heartbeat.from_payload(f"big-{i}", LARGEST, Source.HTTP, None) for i in range(40)
            ]
            await asyncio.wait_for(asyncio.gather(*(forwarder.forward(b) for b in beats)), 30)
            channel = await connection.channel()
            queue = await channel.declare_queue(topology.WORK_QUEUE, durable=True, passive=True)
            bodies = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                bodies.append(message.body)
            return bodies

    bodies = asyncio.run(scenario())
    assert len(bodies) > 1, "40 of the largest heartbeats cannot travel in one message"
    assert all(len(body) <= MAX_WORK_MESSAGE_BYTES for body in bodies)
    devices = sorted(item.device_id for body in bodies for item in decode_work(body))
    assert devices == sorted(f"big-{i}" for i in range(40))
