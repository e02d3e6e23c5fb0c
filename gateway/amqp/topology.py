"""Broker topology: the exchanges, queues and bindings every service relies on.

It is declared in one place: here. `rabbitmq/definitions.json` is rendered from it (the broker
loads that file at boot, so the queues exist before the first device connects) and every
service declares it again on connect, which is idempotent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aio_pika

#: RabbitMQ's MQTT plugin publishes here, with topic `a/b/c` mapped to routing key `a.b.c`.
MQTT_EXCHANGE = "amq.topic"
#: Everything devices publish under `devices/` lands in this queue; the bridge consumes it.
MQTT_INBOX_QUEUE = "gateway.mqtt.inbox"
MQTT_INBOX_BINDING = "devices.#"

#: Canonical messages (normalized heartbeats), published by the bridge and the api.
WORK_EXCHANGE = "gateway.heartbeats"
WORK_QUEUE = "gateway.heartbeats"

#: Devices' replies to commands, converted (by the bridge from MQTT, by the api from HTTP);
#: the worker applies them.
REPLIES_EXCHANGE = "gateway.replies"
REPLIES_QUEUE = "gateway.replies"

#: Dead letters: input that could not become a canonical message, with the reason.
REJECTED_EXCHANGE = "gateway.rejected"
REJECTED_QUEUE = "gateway.rejected"


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


EXCHANGES = (
    Exchange(WORK_EXCHANGE, "topic"),
    Exchange(REJECTED_EXCHANGE, "fanout"),
    Exchange(REPLIES_EXCHANGE, "fanout"),
)
QUEUES = (
    Queue(MQTT_INBOX_QUEUE),
    Queue(WORK_QUEUE),
    Queue(REJECTED_QUEUE),
    Queue(REPLIES_QUEUE),
)
BINDINGS = (
    Binding(MQTT_EXCHANGE, MQTT_INBOX_QUEUE, MQTT_INBOX_BINDING),
    Binding(WORK_EXCHANGE, WORK_QUEUE, "#"),
    Binding(REJECTED_EXCHANGE, REJECTED_QUEUE, ""),
    Binding(REPLIES_EXCHANGE, REPLIES_QUEUE, ""),
)


#: Routing key of a work message carrying several canonical messages.
BATCH_ROUTING_KEY = "batch"


def work_routing_key(device_id: str) -> str:
    return f"heartbeat.{device_id}"


async def declare(
    channel: aio_pika.abc.AbstractChannel, *, inbox: bool = False
) -> dict[str, aio_pika.abc.AbstractQueue]:
    """Declare the topology on `channel` (safe to repeat); returns the queues by name.

    The MQTT inbox and its binding to `amq.topic` only with `inbox` (the bridge's: no other
    account may read `amq.topic`). Consume from these objects: a robust channel restores the
    queues declared through it, and their consumers, after it reconnects (a queue fetched with
    `get_queue` would be forgotten).
    """
    exchanges = {MQTT_EXCHANGE: await channel.get_exchange(MQTT_EXCHANGE, ensure=False)}
    for exchange in EXCHANGES:
        exchanges[exchange.name] = await channel.declare_exchange(
            exchange.name, exchange.type, durable=True
        )
    queues = {}
    for queue in QUEUES:
        if queue.name == MQTT_INBOX_QUEUE and not inbox:
            continue
        queues[queue.name] = await channel.declare_queue(
            queue.name, durable=True, arguments=queue.arguments or None
        )
    for binding in BINDINGS:
        if binding.queue in queues:
            await queues[binding.queue].bind(exchanges[binding.exchange], binding.routing_key)
    return queues


def definitions(vhost: str = "/") -> dict[str, Any]:
    """The topology in RabbitMQ's definitions format (`load_definitions`).

    A node that loads definitions at boot creates no default user or vhost: the vhost is here,
    the users in `gateway.amqp.accounts` (their passwords are the deployment's own).
    """
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for e in EXCHANGES
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": dict(q.arguments),
            }
            for q in QUEUES
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in BINDINGS
        ],
    }


def render_definitions() -> str:
    return json.dumps(definitions(), indent=2) + "\n"
