"""The command dispatcher: pending commands to the broker, and the expiry sweep.

Each pass claims the oldest pending commands for a short lease (`claimed_until`, taken with
`FOR UPDATE SKIP LOCKED` and committed at once: several api processes never take the same one,
and no row stays locked while it is published), publishes each to `devices/<id>/commands` with
the broker's own expiry set to what is left of its time to live, and marks it `sent` only after
the broker confirmed it. A process killed in between leaves the command `pending`; once the
lease ends the next pass publishes it again: at least once, and the device drops the repeat by
id. The sweep moves live commands past
`expires_at` to `expired`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.amqp.publisher import Publisher, PublishFailed
from gateway.contract.commands import Command, CommandStatus
from gateway.contract.messages import utcnow
from gateway.runtime import metrics
from gateway.runtime.lifecycle import sleep_or_stop
from gateway.storage import command_store
from gateway.storage.engine import short_error

log = logging.getLogger(__name__)

#: Commands published per pass (one transaction).
BATCH = 100


class Dispatcher:
    def __init__(self, engine: Engine, publisher: Publisher, *, period_s: float = 1.0) -> None:
        self.engine = engine
        self.publisher = publisher
        self.period_s = period_s
        self._wake = asyncio.Event()
        self.published = 0
        #: Devices that came online, whose live `sent` commands are published again.
        self._returned: set[str] = set()
        self._next_sweep = 0.0

    def wake(self) -> None:
        """A command was stored: dispatch now rather than at the next period."""
        self._wake.set()

    def came_online(self, device_id: str) -> None:
        """The device is back: what it was sent and has not answered is published again (a
        session that was not kept lost it; a kept one gets a repeat, dropped by its id)."""
        self._returned.add(device_id)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = self.period_s
        while not stop.is_set():
            try:
                more = await self.dispatch_once()
                await self.resend_returned()
                if time.monotonic() >= self._next_sweep:  # once a period, however busy
                    self._next_sweep = time.monotonic() + self.period_s
                    await asyncio.to_thread(self._expire)
                delay = self.period_s
            except Exception as exc:  # never dies: a pass that fails is tried again
                metrics.PUBLISH_FAILURES.labels("dispatcher").inc()
                if isinstance(exc, SQLAlchemyError | PublishFailed):
                    log.warning(
                        "commands not dispatched (%s); retrying in %.1f s", _short(exc), delay
                    )
                else:
                    log.exception("commands not dispatched; retrying in %.1f s", delay)
                more = False
                await sleep_or_stop(stop, delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 10.0)
                continue
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait(stop), self.period_s)
            self._wake.clear()

    async def _wait(self, stop: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def dispatch_once(self) -> bool:
        """Publish one batch of pending commands; True when there may be more."""
        self._wake.clear()
        claimed = await asyncio.to_thread(self._claim)
        if not claimed:
            return False
        try:
            confirmed = await self._publish(claimed)
        except Exception:
            await asyncio.to_thread(self._release, [c.id for c in claimed])
            raise
        done = {c.id for c in confirmed}
        await asyncio.to_thread(
            self._mark_sent, list(done), [c.id for c in claimed if c.id not in done]
        )
        self.published += len(confirmed)
        return len(claimed) == BATCH

    def _claim(self) -> list[Command]:
        with self.engine.begin() as conn:
            return command_store.claim_pending(conn, BATCH)

    def _release(self, ids: list) -> None:
        try:
            with self.engine.begin() as conn:
                command_store.release(conn, ids)
        except SQLAlchemyError as exc:  # the lease ends by itself
            log.warning("claims not released (%s); they lapse", short_error(exc))

    def _mark_sent(self, confirmed: list, unconfirmed: list) -> None:
        with self.engine.begin() as conn:
            command_store.mark_sent(conn, confirmed, "mqtt")
            command_store.release(conn, unconfirmed)

    async def resend_returned(self) -> None:
        """Publish again the live `sent` commands of the devices that came online."""
        if not self._returned:
            return
        returned, self._returned = self._returned, set()

        def live() -> list[Command]:
            with self.engine.connect() as conn:
                return [
                    c
                    for device_id in sorted(returned)
                    for c in command_store.live_for_device(conn, device_id)
                    if c.status == CommandStatus.SENT
                ]

        try:
            again = await asyncio.to_thread(live)
            if again:
                await self._publish(again)
                log.info("%d commands sent again to devices back online", len(again))
        except Exception:
            self._returned |= returned  # tried again at the next pass
            raise

    async def _publish(self, claimed: list[Command]) -> list[Command]:
        """Publish concurrently; the confirmed ones. Raises PublishFailed when none was."""
        now = utcnow()
        live = [c for c in claimed if (c.expires_at - now).total_seconds() > 0.001]

        async def one(c: Command) -> Command:
            left_ms = int((c.expires_at - utcnow()).total_seconds() * 1000)
            await self.publisher.publish_command(c.device_id, c.wire(), left_ms)
            return c

        results = await asyncio.gather(*(one(c) for c in live), return_exceptions=True)
        confirmed = [r for r in results if isinstance(r, Command)]
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, PublishFailed):
                raise failure
        if failures:
            log.warning("%d of %d commands not confirmed by the broker", len(failures), len(live))
            if not confirmed:
                raise failures[0]
        return confirmed

    def _expire(self) -> None:
        with self.engine.begin() as conn:
            expired = command_store.expire_due(conn)
        if expired:
            log.info("%d commands expired", len(expired))


def _short(exc: Exception) -> str:
    return short_error(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
