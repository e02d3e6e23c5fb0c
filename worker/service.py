"""The worker: work queue in, one transaction per batch, Redis mirror, then ack."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika.abc
import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.amqp import topology
from gateway.amqp.acks import Acks
from gateway.amqp.connection import broker_ready, connect
from gateway.amqp.publisher import Publisher, PublishFailed
from gateway.contract.messages import (
    Heartbeat,
    Rejection,
    Source,
    StatusReport,
    encode_work,
    read_dead_letter,
    read_work,
    utcnow,
)
from gateway.contract.reasons import InputError, Reason
from gateway.runtime import metrics
from gateway.runtime.health import HealthServer
from gateway.runtime.lifecycle import sleep_or_stop
from gateway.runtime.retry import Backoff
from gateway.runtime.settings import WorkerSettings
from gateway.storage import mirror, partitions, retention, writes
from gateway.storage.engine import check_storage, is_transient, make_engine, short_error
from worker.batcher import Batcher, Message
from worker.replies import Replies
from worker.sweeper import Sweeper

log = logging.getLogger(__name__)

#: Writes of one message the database refuses before it becomes a dead letter.
MAX_ATTEMPTS = 3
#: Ids of the dead letters of messages from disabled devices, derived from the messages' ids.
DISABLED_NAMESPACE = uuid.UUID("0d3a2f6e-8c47-4f0b-9b1e-5a4c7e2d9f31")


@dataclass
class Written:
    batches: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    slowest_s: float = 0.0
    since: float = field(default_factory=time.monotonic)

    def add(self, stored: int, duplicates: int, rejected: int, seconds: float) -> None:
        self.batches += 1
        self.stored += stored
        self.duplicates += duplicates
        self.rejected += rejected
        self.slowest_s = max(self.slowest_s, seconds)

    def __str__(self) -> str:
        return (
            f"{self.batches} batches, {self.stored} stored, {self.duplicates} duplicates, "
            f"{self.rejected} rejected; slowest batch {self.slowest_s * 1000:.0f} ms"
        )


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.engine: Engine = make_engine(str(settings.database_url), pool_size=3, pre_ping=False)
        self.redis = redis.Redis.from_url(
            str(settings.redis_url), socket_timeout=2, socket_connect_timeout=2
        )
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self.breaker = mirror.Breaker()
        #: Rebuild the mirror before the next write: at start when Redis lacks it, and after
        #: Redis was unreachable (writes were skipped meanwhile).
        self._needs_rebuild = True
        self._stopping = asyncio.Event()
        #: What was written since the last summary line (each batch is logged at DEBUG only).
        self._written = Written()
        self.acks = Acks()

    # ---- heartbeats and status reports ----------------------------------------------------

    async def _receive(self, batcher: Batcher, message: Message) -> None:
        self.acks.delivered(message)
        await batcher.add(message)

    async def flush_work(self, messages: list[Message]) -> None:
        started = time.perf_counter()
        items: list[Heartbeat | StatusReport] = []
        invalid: list[Rejection] = []
        for message in messages:
            good, bad = read_work(message.body)
            items.extend(good)
            invalid.extend(bad)
        result = await self._store(items, invalid)
        if result is None:
            return  # shutting down with the database away: unacked messages are redelivered
        for message in messages:
            self.acks.done(message)
        elapsed = time.perf_counter() - started
        metrics.BATCH_SIZE.observe(len(items) + len(invalid))
        metrics.BATCH_SECONDS.observe(elapsed)
        self._written.add(result.inserted, result.duplicates, len(invalid), elapsed)
        log.debug(
            "batch: %d messages (%d items), %d stored, %d duplicates, %d rejected, %d devices, "
            "%.1f ms",
            len(messages),
            len(items),
            result.inserted,
            result.duplicates,
            len(invalid),
            len(result.states),
            elapsed * 1000,
        )

    async def _store(
        self,
        items: Sequence[Heartbeat | StatusReport],
        invalid: list[Rejection],
    ) -> writes.BatchResult | None:
        """Write the batch. When the database refuses it, write the messages one by one, each
        at most `MAX_ATTEMPTS` times, and dead-letter the ones it keeps refusing: a bad message
        costs one dead letter, never a loop or a blocked queue."""
        try:
            result = await self._retry_transient(lambda: self._write(items))
        except SQLAlchemyError as exc:
            metrics.STORE_ERRORS.labels("batch").inc()
            log.warning("batch of %d refused (%s); isolating the bad", len(items), short_error(exc))
            result = writes.BatchResult()
            for item in items:
                one = await self._write_one(item, invalid)
                if one is None:
                    return None
                result.add(one)
        if result is None:
            return None
        invalid.extend(_refused_as_disabled(m) for m in result.disabled)
        for rejection in invalid:
            if not await self._dead_letter(rejection):
                return None
        return result

    async def _write_one(
        self, item: Heartbeat | StatusReport, invalid: list[Rejection]
    ) -> writes.BatchResult | None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self._retry_transient(lambda: self._write([item]))
            except SQLAlchemyError as exc:
                if attempt < MAX_ATTEMPTS:
                    await asyncio.sleep(0.1 * attempt)
                    continue
                error = InputError(
                    Reason.UNSTORABLE,
                    f"refused {MAX_ATTEMPTS} times by the database: {short_error(exc)}",
                )
                raw = item.model_dump_json().encode()
                invalid.append(
                    Rejection.of(
                        error,
                        raw,
                        Source.WORK_QUEUE,
                        device_id=item.device_id,
                        received_at=item.received_at,  # when its device sent it: replay keeps it
                    )
                )
        return writes.BatchResult()

    def _write(self, items: Sequence[Heartbeat | StatusReport]) -> writes.BatchResult:
        beats = [i for i in items if isinstance(i, Heartbeat)]
        statuses = [i for i in items if isinstance(i, StatusReport)]
        with self.engine.begin() as conn:
            result = writes.write_batch(
                conn,
                beats,
                statuses,
                default_interval_s=self.settings.default_heartbeat_interval_s,
                offline_factor=self.settings.offline_factor,
                dedup_window_days=self.settings.dedup_window_days,
            )
        for event in result.events:
            metrics.STATUS_CHANGES.labels(event.to_status.value, event.reason).inc()
        committed = utcnow()
        metrics.PERSISTED.inc(result.inserted)
        metrics.DUPLICATES.inc(result.duplicates)
        for b in beats:
            metrics.LATENCY.observe(max((committed - b.received_at).total_seconds(), 0.0))
        self._mirror(result.states)
        return result

    def _mirror(self, states: list[mirror.DeviceState]) -> None:
        """Copy committed state to Redis. While Redis is down it is skipped (PostgreSQL holds
        the truth), and `_keep_mirror` rebuilds the whole mirror once Redis is back."""
        if states and not self.breaker.call(
            lambda: mirror.mirror(self.redis, states),
            service="worker",
            skipped="mirror skipped; rebuilt once Redis is back",
        ):
            self._needs_rebuild = True

    async def _keep_mirror(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        """Rebuild the whole mirror from PostgreSQL whenever Redis lacks it: at start, as soon
        as Redis is back after skipped writes, and when Redis came back empty (a restart keeps
        nothing on disk; a flush) though no write failed meanwhile, as while devices are quiet:
        its rebuilt mark is gone. Off the batch path: batches go on meanwhile (writes are
        versioned, so neither overwrites the other's newer state)."""
        while not stop.is_set():
            if self.breaker.allow():
                if not self._needs_rebuild and await asyncio.to_thread(self._mirror_lost):
                    self._needs_rebuild = True  # only ever set here: a skipped write sets it too
                if self._needs_rebuild:
                    await asyncio.to_thread(self._rebuild)
            await sleep_or_stop(stop, every_s)

    def _mirror_lost(self) -> bool:
        """Redis answers, without the mark of a rebuilt mirror (one EXISTS)."""
        marked = self.breaker.call(
            lambda: mirror.is_rebuilt(self.redis), service="worker", skipped="mirror not checked"
        )
        return marked is False

    async def _watch_queues(self, stop: asyncio.Event, every_s: float = 5.0) -> None:
        """Consumer lag: how many messages wait in each queue (a passive declare; ready
        messages, so not the ones a consumer holds)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        while not stop.is_set():
            for name in (topology.MQTT_INBOX_QUEUE, topology.WORK_QUEUE, topology.REJECTED_QUEUE):
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except Exception:  # the broker is away: report nothing rather than stale counts
                    metrics.QUEUE_DEPTH.labels(name).set(float("nan"))
                    continue
                metrics.QUEUE_DEPTH.labels(name).set(queue.declaration_result.message_count)
            await sleep_or_stop(stop, every_s)

    async def _summarize(self, stop: asyncio.Event, every_s: float = 60.0) -> None:
        """One INFO line a minute on what was written, instead of one per batch."""
        while not stop.is_set():
            await sleep_or_stop(stop, every_s)
            self.summarize()

    def summarize(self) -> None:
        """Log what was written since the last call, if anything, and start counting again."""
        written, self._written = self._written, Written()
        if written.batches:
            log.info("last %.0f s: %s", time.monotonic() - written.since, written)

    async def _maintain(self, stop: asyncio.Event) -> None:
        """Heartbeat partitions created ahead and dropped after the retention period; dead
        letters and status events deleted after theirs. Now and then every
        `maintenance_period_s` (any worker may; one at a time)."""
        s = self.settings
        tasks = {
            "partition maintenance": functools.partial(
                partitions.run,
                self.engine,
                ahead_days=s.partitions_ahead_days,
                retention_days=s.retention_days,
            ),
            "retention": functools.partial(
                retention.run,
                self.engine,
                dead_letter_days=s.dead_letter_retention_days,
                event_days=s.event_retention_days,
                keep_going=lambda: not stop.is_set(),
            ),
        }
        while not stop.is_set():
            for what, task in tasks.items():
                try:
                    await asyncio.to_thread(task)
                except SQLAlchemyError as exc:
                    log.warning("%s failed (%s); will retry", what, short_error(exc))
            await sleep_or_stop(stop, s.maintenance_period_s)

    def _rebuild(self) -> None:
        self._needs_rebuild = False  # a write skipped from now on asks for another rebuild
        started = time.perf_counter()
        try:
            with self.engine.connect() as conn:
                count = self.breaker.call(
                    lambda: mirror.rebuild(self.redis, writes.iter_states(conn)),
                    service="worker",
                    skipped="mirror not rebuilt yet",
                )
        except SQLAlchemyError as exc:
            log.warning("mirror not rebuilt (%s); will retry", short_error(exc))
            count = None
        if count is None:
            self._needs_rebuild = True
            return
        log.info(
            "rebuilt the Redis mirror of %d devices in %.1f s",
            count,
            time.perf_counter() - started,
        )

    async def _retry_transient(self, write):
        """Run `write` in a thread; retry while the database is unreachable, until stopping."""
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                return await asyncio.to_thread(write)
            except SQLAlchemyError as exc:
                if not is_transient(exc):
                    raise
                metrics.STORE_ERRORS.labels("unavailable").inc()
                if self._stopping.is_set():
                    log.warning("database unavailable while stopping; leaving batch unacked")
                    return None
                delay = backoff.next()
                log.warning(
                    "database unavailable (%s); retrying in %.1f s", short_error(exc), delay
                )
                await asyncio.sleep(delay)

    async def _dead_letter(self, rejection: Rejection) -> bool:
        assert self._publisher is not None
        try:
            await self._publisher.publish_rejection(rejection)
        except PublishFailed as exc:
            log.warning("could not dead-letter %s: %s", rejection.id, exc)
            return False
        metrics.REJECTED.labels(rejection.source.value, rejection.reason.value).inc()
        log.warning("dead-lettered a message: %s: %s", rejection.reason, rejection.detail)
        return True

    # ---- dead letters ---------------------------------------------------------------------

    async def flush_rejected(self, messages: list[Message]) -> None:
        rejections = [read_dead_letter(message.headers, message.body) for message in messages]

        def write() -> writes.RejectionsWritten:
            with self.engine.begin() as conn:
                return writes.write_rejections(
                    conn, rejections, cap_per_hour=self.settings.dead_letter_cap_per_hour
                )

        written = await self._retry_transient(write)
        if written is None:
            return
        metrics.DEAD_LETTERS_STORED.inc(written.kept)
        for source, count in written.over_cap.items():
            metrics.DEAD_LETTERS_OVER_CAP.labels(source).inc(count)
        for message in messages:
            self.acks.done(message)
        if written.over_cap:
            log.info(
                "stored %d dead letters; %d over the cap of %d per device and hour, counted",
                written.kept,
                sum(written.over_cap.values()),
                self.settings.dead_letter_cap_per_hour,
            )
        else:
            log.info("stored %d dead letters", written.kept)

    # ---- lifecycle ------------------------------------------------------------------------

    async def ready(self) -> dict[str, bool]:
        return {
            "rabbitmq": broker_ready(self._connection, self._publisher),
            **await check_storage(self.engine, self.redis),
        }

    async def serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        health = HealthServer(s.health_host, s.worker_health_port, self.ready)
        await health.start()
        self._connection = await connect(str(s.amqp_url), name="gateway-worker")
        with contextlib.suppress(redis.RedisError):
            self._needs_rebuild = not await asyncio.to_thread(mirror.is_rebuilt, self.redis)
        try:
            self._publisher = await Publisher.open(self._connection, timeout=10)
            work = Batcher(
                self.flush_work, size=s.worker_batch_size, linger_s=s.worker_linger_ms / 1000
            )
            dead = Batcher(self.flush_rejected, size=s.worker_batch_size, linger_s=0.2)
            replies = Replies(self.engine, self._dead_letter, self._retry_transient)
            answered = Batcher(
                functools.partial(replies.flush, acks=self.acks), size=100, linger_s=0
            )
            consumers = []
            for queue_name, batcher, prefetch in (
                (topology.WORK_QUEUE, work, s.worker_prefetch),
                (topology.REJECTED_QUEUE, dead, max(s.worker_batch_size, 100)),
                (topology.REPLIES_QUEUE, answered, 100),
            ):
                channel = await self._connection.channel()
                await channel.set_qos(prefetch_count=prefetch)
                queue = (await topology.declare(channel))[queue_name]
                receive = functools.partial(self._receive, batcher)
                consumers.append((queue, await queue.consume(receive)))
                log.info("worker consuming %s (prefetch %d)", queue_name, prefetch)
            sweeper = Sweeper(
                self.engine, period_s=s.worker_sweep_period_s, on_changed=self._mirror
            )
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(work.run(self._stopping), name="batches:heartbeats")
                tasks.create_task(dead.run(self._stopping), name="batches:rejected")
                tasks.create_task(answered.run(self._stopping), name="batches:replies")
                tasks.create_task(self._keep_mirror(self._stopping), name="redis:mirror")
                tasks.create_task(self._watch_queues(self._stopping), name="queues:depth")
                tasks.create_task(sweeper.run(self._stopping), name="sweeper")
                tasks.create_task(self._maintain(self._stopping), name="partitions")
                tasks.create_task(self._summarize(self._stopping), name="summary")
                await stop.wait()
                log.info(
                    "stopping: no new messages; flushing %d",
                    work.pending + dead.pending + answered.pending,
                )
                for queue, tag in consumers:
                    await queue.cancel(tag)
                self._stopping.set()
            await self.acks.drain()
        finally:
            await self._connection.close()
            await health.close()
            self.engine.dispose()
            self.redis.close()


def _refused_as_disabled(message: Heartbeat | StatusReport) -> Rejection:
    """A dead letter for a message its device sent before it was disabled. Its id follows from
    the message's, so a redelivered batch dead-letters it once."""
    error = InputError(
        Reason.DEVICE_DISABLED,
        f"device {message.device_id!r} was disabled before this {message.kind} was stored",
    )
    rejection = Rejection.of(
        error,
        encode_work(message),
        Source.WORK_QUEUE,
        device_id=message.device_id,
        received_at=message.received_at,
    )
    return rejection.model_copy(update={"id": uuid.uuid5(DISABLED_NAMESPACE, str(message.id))})
