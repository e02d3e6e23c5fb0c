"""The bridge: MQTT inbox in, canonical messages (or dead letters) out, ack after confirm."""

from __future__ import annotations

import asyncio
import logging
import time

import aio_pika.abc

from gateway.amqp import topology
from gateway.amqp.acks import Acks
from gateway.amqp.connection import broker_ready, connect
from gateway.amqp.publisher import Forwarder, Publisher, PublishFailed
from gateway.contract.conversion import Forward, ForwardReply, Ignore, Outcome, Reject, convert
from gateway.contract.messages import Rejection, Source
from gateway.contract.reasons import unforeseen
from gateway.contract.topics import mqtt_topic
from gateway.runtime import metrics
from gateway.runtime.health import HealthServer
from gateway.runtime.lifecycle import InFlight, sleep_or_stop
from gateway.runtime.settings import BridgeSettings

log = logging.getLogger(__name__)

PUBLISH_RETRY_DELAY_S = 1.0


class Bridge:
    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.in_flight = InFlight()
        self.acks = Acks()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._forwarder: Forwarder | None = None
        self._forwarded = 0
        self._rejected = 0

    async def handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Convert, publish with confirm, then ack the inbox message (never before)."""
        assert self._publisher is not None
        self.acks.delivered(message)
        with self.in_flight:
            outcome = convert(message.routing_key or "", message.body)
            try:
                await self._send(message, outcome)
            except Exception as exc:
                # Requeued, never left hanging: an unfinished message would hold back the acks
                # of every message delivered after it.
                metrics.PUBLISH_FAILURES.labels("bridge").inc()
                if isinstance(exc, PublishFailed):
                    log.warning("not forwarded, will be redelivered: %s", exc)
                else:
                    log.exception("not forwarded (unexpected error), will be redelivered")
                await asyncio.sleep(PUBLISH_RETRY_DELAY_S)  # no hot loop while the broker refuses
                self.acks.requeue(message)
                return
            self.acks.done(message)

    async def _send(self, message: aio_pika.abc.AbstractIncomingMessage, outcome: Outcome) -> None:
        """Forward a canonical message or publish a dead letter; PublishFailed when the broker
        did not confirm it. A canonical message that cannot be sent for any other reason would
        fail again on redelivery: it becomes a dead letter (`unexpected_error`) instead."""
        assert self._publisher is not None and self._forwarder is not None
        if isinstance(outcome, Forward):
            try:
                await self._forwarder.forward(outcome.message)
            except PublishFailed:
                raise
            except Exception as exc:
                error = unforeseen(exc, "a canonical message to forward")
                rejection = Rejection.of(
                    error,
                    message.body,
                    Source.MQTT,
                    device_id=outcome.message.device_id,
                    topic=mqtt_topic(message.routing_key or ""),
                    received_at=outcome.message.received_at,
                )
                outcome = Reject(rejection)
            else:
                metrics.RECEIVED.labels(Source.MQTT.value).inc()
                self._forwarded += 1
                return
        match outcome:
            case ForwardReply(reply):
                await self._publisher.publish_reply(reply)
            case Reject(rejection):
                await self._publisher.publish_rejection(rejection)
                metrics.REJECTED.labels(Source.MQTT.value, rejection.reason.value).inc()
                self._rejected += 1
                log.info(
                    "rejected %s from topic %r: %s",
                    rejection.reason,
                    rejection.topic,
                    rejection.detail,
                )
            case Ignore(why):
                log.debug("ignored %s: %s", message.routing_key, why)

    async def ready(self) -> dict[str, bool]:
        return {"rabbitmq": broker_ready(self._connection, self._publisher)}

    async def serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        health = HealthServer(s.health_host, s.bridge_health_port, self.ready)
        await health.start()
        self._connection = await connect(str(s.amqp_url), name="gateway-bridge")
        try:
            self._publisher = await Publisher.open(
                self._connection, timeout=s.bridge_confirm_timeout_s
            )
            self._forwarder = Forwarder(
                self._publisher, size=s.bridge_batch_size, linger_s=s.bridge_linger_ms / 1000
            )
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=s.bridge_prefetch)
            inbox = (await topology.declare(channel, inbox=True))[topology.MQTT_INBOX_QUEUE]
            tag = await inbox.consume(self.handle)
            log.info("bridge consuming %s (prefetch %d)", inbox.name, s.bridge_prefetch)
            await self._report_until(stop)
            log.info("stopping: no new messages; %d in flight", self.in_flight.count)
            await inbox.cancel(tag)
            if not await self.in_flight.wait_idle(s.shutdown_timeout_s):
                log.warning(
                    "%d messages unfinished; they will be redelivered", self.in_flight.count
                )
            await self.acks.drain()
        finally:
            await self._connection.close()
            await health.close()

    async def _report_until(self, stop: asyncio.Event, every: float = 10.0) -> None:
        """One summary line per period, never one per message."""
        last = time.monotonic()
        while not stop.is_set():
            await sleep_or_stop(stop, every)
            if self._forwarded or self._rejected:
                elapsed = time.monotonic() - last
                log.info(
                    "forwarded %d, rejected %d in %.0f s", self._forwarded, self._rejected, elapsed
                )
                self._forwarded = self._rejected = 0
            last = time.monotonic()
