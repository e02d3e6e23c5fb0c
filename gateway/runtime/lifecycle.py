"""What the bridge and worker share around their loop: logging, signals, health, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from gateway.runtime import logs
from gateway.runtime.settings import CommonSettings

log = logging.getLogger(__name__)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less when `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def run(
    name: str, settings: CommonSettings, serve: Callable[[asyncio.Event], Awaitable[None]]
) -> int:
    """Run `serve(stop)` until SIGTERM or SIGINT sets `stop`; exit 0 after a clean shutdown."""
    logs.configure(settings.log_level, settings.log_format)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            log.info("%s: stopping", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await serve(stop)

    try:
        asyncio.run(main())
    except ConnectionError as exc:
        log.error("%s cannot start: %s", name, exc)
        return 1
    log.info("%s stopped", name)
    return 0


class InFlight:
    """Counts messages being handled, so shutdown can wait for them to finish."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self._count += 1
        self._idle.clear()

    def __exit__(self, *exc: object) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
