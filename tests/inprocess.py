"""Gateway parts run inside the test process against the real broker and database: a bridge or
worker of its own in a vhost of its own, and the helpers that publish to them and read what
they produced."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aio_pika
from sqlalchemy import Engine, func, select
from support import apoll

from bridge.service import Bridge
from gateway.amqp import topology
from gateway.amqp.publisher import Publisher
from gateway.contract.messages import (
    Heartbeat,
    Source,
)
from gateway.contract.payload import HeartbeatPayload
from gateway.runtime.settings import BridgeSettings, WorkerSettings
from gateway.storage.schema import heartbeats
from worker.service import Worker


async def publish_as_mqtt(channel: aio_pika.abc.AbstractChannel, key: str, body: bytes) -> None:
    exchange = await channel.get_exchange(topology.MQTT_EXCHANGE)
    await exchange.publish(
        aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"x-mqtt-publish-qos": 1, "x-mqtt-dup": False},
        ),
        key,
    )


async def take(channel: aio_pika.abc.AbstractChannel, queue: str) -> aio_pika.IncomingMessage:
    q = await channel.get_queue(queue)
    return await apoll(lambda: q.get(no_ack=True, fail=False), what=f"a message on {queue}")


async def depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, durable=True, passive=True)
    return declared.declaration_result.message_count


@contextlib.asynccontextmanager
async def declared(vhost: str) -> AsyncIterator[tuple[aio_pika.abc.AbstractConnection, Any]]:
    """A connection to the test vhost, and a channel on which the topology is declared."""
    async with await aio_pika.connect(vhost) as conn:
        channel = await conn.channel()
        await topology.declare(channel, inbox=True)
        yield conn, channel


def bridge_for(url: str) -> Bridge:
    return Bridge(BridgeSettings(amqp_url=url, bridge_health_port=0))


def worker_for(url: str, stack, **overrides) -> Worker:
    settings = WorkerSettings(
        amqp_url=url,
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        worker_health_port=0,
        **overrides,
    )
    return Worker(settings)


def beat(device: str, msg_id: str, at: datetime, **metrics) -> Heartbeat:
    payload = HeartbeatPayload(msg_id=msg_id, seq=int(msg_id.rsplit("-", 1)[-1]), metrics=metrics)
    return Heartbeat.from_payload(device, payload, Source.MQTT, received_at=at)


def count_rows(engine: Engine, device: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(
            select(func.count()).select_from(heartbeats).where(heartbeats.c.device_id == device)
        )


async def open_publisher(conn: aio_pika.abc.AbstractConnection) -> Publisher:
    return await Publisher.open(conn, timeout=10)
