"""The one retry policy of the gateway: capped exponential backoff with jitter.

Every loop that waits for something to come back (the broker at start, PostgreSQL for a batch,
the status stream's LISTEN connection, Redis behind the breaker) takes its delays from a
`Backoff`, so they all behave alike: the first retry comes soon, a long outage costs one attempt
every `maximum` seconds, and a fleet of processes restarted together does not retry in step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """Delays `initial`, `initial * factor`, ... capped at `maximum`; each one drawn with jitter
    from [delay * (1 - jitter), delay]. `reset()` once the thing waited for answered."""

    def __init__(
        self, initial: float, maximum: float, *, factor: float = 2.0, jitter: float = 0.5
    ) -> None:
        if not (0 < initial <= maximum and factor >= 1 and 0 <= jitter < 1):
            raise ValueError("need 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._next = initial

    @property
    def ceiling(self) -> float:
        """The longest the next delay can be (what a log line should promise)."""
        return self._next

    def next(self) -> float:
        """The delay to wait now; the following one grows."""
        delay = self._next * random.uniform(1 - self.jitter, 1.0)
        self._next = min(self._next * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Breaker:
    """Skips a dependency for a while after it failed, so a cache that is down costs one timeout
    now and then instead of one per request or batch. The pause follows a `Backoff` (without
    jitter: one process, one dependency) while the dependency stays down."""

    def __init__(self, cooldown_s: float = 0.5, max_cooldown_s: float = 5.0) -> None:
        self._backoff = Backoff(cooldown_s, max_cooldown_s, jitter=0.0)
        self._open_until = 0.0

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self) -> None:
        self._open_until = time.monotonic() + self._backoff.next()

    def succeeded(self) -> None:
        self._backoff.reset()
        self._open_until = 0.0

    def attempt(
        self,
        call: Callable[[], T],
        *,
        errors: type[BaseException] | tuple[type[BaseException], ...],
        on_error: Callable[[BaseException], None],
    ) -> T | None:
        """`call()` unless the dependency failed a moment ago; None when it fails now (after
        `on_error(exc)` for one of `errors`)."""
        if not self.allow():
            return None
        try:
            result = call()
        except errors as exc:
            self.failed()
            on_error(exc)
            return None
        self.succeeded()
        return result
