"""Confirmed publishing, shared by bridge, worker and api: `Publisher` returns once the broker
confirmed; `Forwarder` gathers concurrent callers' messages into one work message."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import aio_pika.abc
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pamqp.commands import Basic

from gateway.amqp import topology
from gateway.contract.commands import CommandMessage, CommandReply
from gateway.contract.messages import (
    CONTENT_TYPE,
    Heartbeat,
    Rejection,
    StatusReport,
    WorkBatch,
    encode_work,
)
from gateway.contract.topics import Topic, TopicKind

log = logging.getLogger(__name__)


#: How many canonical messages a work message carries (read by the worker to size batches).
ITEMS_HEADER = "x-gateway-items"
#: The largest work message the Forwarder publishes: under the broker's `max_message_size`
#: (rabbitmq.conf, 256 KiB) with room for the properties, and over the largest heartbeat.
MAX_WORK_MESSAGE_BYTES = 192 * 1024


class PublishFailed(RuntimeError):
    """The broker did not confirm a message: it must not be acknowledged upstream."""


class Publisher:
    """Publishes canonical messages and dead letters; returns only once the broker confirmed."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, *, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._work: aio_pika.abc.AbstractExchange | None = None
        self._rejected: aio_pika.abc.AbstractExchange | None = None
        self._replies: aio_pika.abc.AbstractExchange | None = None
        self._devices: aio_pika.abc.AbstractExchange | None = None

    @classmethod
    async def open(
        cls, connection: aio_pika.abc.AbstractConnection, *, timeout: float
    ) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await topology.declare(channel)
        publisher = cls(channel, timeout=timeout)
        publisher._work = await channel.get_exchange(topology.WORK_EXCHANGE, ensure=False)
        publisher._rejected = await channel.get_exchange(topology.REJECTED_EXCHANGE, ensure=False)
        publisher._replies = await channel.get_exchange(topology.REPLIES_EXCHANGE, ensure=False)
        publisher._devices = await channel.get_exchange(topology.MQTT_EXCHANGE, ensure=False)
        return publisher

    async def publish_work(
        self, message: Heartbeat | StatusReport | WorkBatch, body: bytes | None = None
    ) -> None:
        """Publish a work message (`body`: its encoding, when the caller has it already)."""
        batch = isinstance(message, WorkBatch)
        await self._publish(
            self._work,
            aio_pika.Message(
                encode_work(message) if body is None else body,
                headers={ITEMS_HEADER: len(message.items)} if batch else None,
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(message.id),
                type=message.kind,
            ),
            topology.BATCH_ROUTING_KEY if batch else topology.work_routing_key(message.device_id),
        )

    async def publish_rejection(self, rejection: Rejection) -> None:
        await self._publish(
            self._rejected,
            aio_pika.Message(
                rejection.payload,
                headers=rejection.headers(),
                content_type="application/octet-stream",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(rejection.id),
                type="rejected",
            ),
            rejection.reason.value,
        )

    async def publish_reply(self, reply: CommandReply) -> None:
        """A device's reply to a command, converted, for the worker to apply."""
        await self._publish(
            self._replies,
            aio_pika.Message(
                reply.encode(),
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(reply.id),
                type="reply",
            ),
            "",
        )

    async def publish_command(
        self, device_id: str, command: CommandMessage, expiration_ms: int
    ) -> None:
        """A command onto `devices/<id>/commands` (MQTT QoS 1), which the broker drops once
        `expiration_ms` have passed: never delivered after it expired."""
        await self._publish(
            self._devices,
            aio_pika.Message(
                command.encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(command.id),
                expiration=max(expiration_ms, 1) / 1000,
                headers={"x-mqtt-publish-qos": 1},
            ),
            Topic(device_id, TopicKind.COMMANDS).routing_key,
        )

    async def _publish(
        self,
        exchange: aio_pika.abc.AbstractExchange | None,
        message: aio_pika.Message,
        routing_key: str,
    ) -> None:
        assert exchange is not None, "Publisher.open() was not awaited"
        try:
            confirmation = await exchange.publish(
                message, routing_key, mandatory=True, timeout=self._timeout
            )
        except (AMQPError, ChannelInvalidStateError, RuntimeError, TimeoutError, OSError) as exc:
            # RuntimeError: aio-pika's "connection closed" while the broker is away.
            raise PublishFailed(f"broker did not confirm the message: {exc!r}") from exc
        if not isinstance(confirmation, Basic.Ack):
            raise PublishFailed(f"broker did not acknowledge the message: {confirmation!r}")

    @property
    def is_open(self) -> bool:
        return not self._channel.is_closed


class Forwarder:
    """Groups canonical messages into one work message (a `WorkBatch`), published with confirm.

    Each caller of `forward` waits for the confirm of the message that carries its item, so a
    caller acks (or answers 202) exactly as it would for a message of its own. A batch goes out
    when `size` items wait or `linger_s` after the first: under load the broker and the worker
    handle one message per batch instead of one per heartbeat; alone, an item waits `linger_s`.
    """

    def __init__(self, publisher: Publisher, *, size: int, linger_s: float) -> None:
        self._publisher = publisher
        self._size = size
        self._linger_s = linger_s
        self._pending: list[tuple[Heartbeat | StatusReport, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._publishing: set[asyncio.Task] = set()

    async def forward(self, item: Heartbeat | StatusReport) -> None:
        """Returns once the broker confirmed the message carrying `item`; else PublishFailed."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((item, done))
        if len(self._pending) >= self._size:
            self._send()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger_s, self._send)
        await done

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._publish(batch))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _publish(self, batch: list[tuple[Heartbeat | StatusReport, asyncio.Future]]) -> None:
        items = [item for item, _ in batch]
        try:
            message = items[0] if len(items) == 1 else WorkBatch(items=items)
            body = encode_work(message)
            if len(body) > MAX_WORK_MESSAGE_BYTES and len(batch) > 1:
                # The broker refuses big messages: two halves instead, each confirmed for the
                # callers whose items it carries.
                half = len(batch) // 2
                await asyncio.gather(self._publish(batch[:half]), self._publish(batch[half:]))
                return
            await self._publisher.publish_work(message, body)
        except PublishFailed as exc:  # each waiting caller gets it; none waits for ever
            outcome: BaseException | None = exc
        except Exception as exc:
            if len(batch) > 1:
                # Not the broker: one item may be the cause. Each alone, so that it fails
                # only its own caller, never the other devices' messages it shared a batch with.
                await asyncio.gather(*(self._publish([one]) for one in batch))
                return
            outcome = exc
        else:
            outcome = None
        for _, done in batch:
            if done.done():
                continue
            if outcome is None:
                done.set_result(None)
            else:
                done.set_exception(outcome)
