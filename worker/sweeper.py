"""The sweeper: marks silent devices offline when their deadline passes.

Every worker runs one, but only the holder of a PostgreSQL advisory lock sweeps; if its worker
dies, its connection closes, the lock is released and another worker's sweeper takes over
within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from gateway.runtime import metrics
from gateway.runtime.lifecycle import sleep_or_stop
from gateway.storage import liveness
from gateway.storage.engine import short_error
from gateway.storage.mirror import DeviceState

log = logging.getLogger(__name__)

#: How often a worker that is not the sweeper asks for the lock.
STANDBY_RETRY_S = 2.0


class Sweeper:
    def __init__(
        self,
        engine: Engine,
        *,
        period_s: float,
        on_changed: Callable[[list[DeviceState]], None],
        batch: int = 5000,
    ) -> None:
        self._engine = engine
        self._period_s = period_s
        self._on_changed = on_changed
        self._batch = batch
        self._conn: Connection | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                wait = STANDBY_RETRY_S
                try:
                    if self._conn is None:
                        self._conn = await asyncio.to_thread(self._acquire)
                        if self._conn is not None:
                            metrics.SWEEPER_LEADER.set(1)
                            log.info("this worker is the sweeper now")
                    if self._conn is not None:
                        changed = await asyncio.to_thread(self._sweep)
                        wait = 0 if changed >= self._batch else self._period_s
                except SQLAlchemyError as exc:
                    log.warning("sweeper lost the database (%s); will retry", short_error(exc))
                    await asyncio.to_thread(self._release)
                await sleep_or_stop(stop, wait)
        finally:
            await asyncio.to_thread(self._release)

    def _acquire(self) -> Connection | None:
        conn = self._engine.connect()
        try:
            got = conn.scalar(select(func.pg_try_advisory_lock(liveness.SWEEPER_LOCK)))
            conn.commit()
        except SQLAlchemyError:
            conn.close()
            raise
        if got:
            return conn
        conn.close()
        return None

    def _sweep(self) -> int:
        assert self._conn is not None
        with self._conn.begin():
            states, events = liveness.sweep(self._conn, self._batch)
        if events:
            metrics.STATUS_CHANGES.labels("offline", "timeout").inc(len(events))
            log.info("%d devices offline (timeout)", len(events))
            self._on_changed(states)
        return len(states)

    def _release(self) -> None:
        metrics.SWEEPER_LEADER.set(0)
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.invalidate()  # closes the session: the lock goes with it
                self._conn.close()
            self._conn = None
