"""Device state: the model operators read, its status rule, and its Redis mirror.

PostgreSQL holds the truth (`devices`); Redis holds a copy for the read path, keyed by device
and versioned, so a late writer never overwrites newer state.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ConfigDict

from gateway.contract.messages import DeviceStatus, utcnow
from gateway.contract.payload import StoredMetricValue
from gateway.runtime import metrics, retry

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "gateway:device:"
#: Set once the mirror was rebuilt from PostgreSQL; a Redis that restarted (it keeps nothing on
#: disk) comes back without it, and the worker rebuilds.
REBUILT_KEY = "gateway:state:rebuilt"

#: Write `state` only if `version` is newer than the stored one.
_SET_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'state', ARGV[2])
return 1
"""
_SET_IF_NEWER_SHA = hashlib.sha1(_SET_IF_NEWER.encode()).hexdigest()


class DeviceState(BaseModel):
    """One device's latest state, as stored in `devices` and mirrored in Redis."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    heartbeat_interval_s: int
    created_at: datetime
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    last_heartbeat_id: uuid.UUID | None = None
    last_seq: int | None = None
    last_device_ts: datetime | None = None
    last_metrics: dict[str, StoredMetricValue] = {}
    last_source: str | None = None
    status: DeviceStatus = DeviceStatus.NEVER_SEEN
    status_changed_at: datetime | None = None
    status_reason: str | None = None
    offline_deadline: datetime | None = None
    version: int
    enabled: bool = True
    registered_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DeviceState:
        return cls.model_validate(dict(row))

    def status_at(self, now: datetime | None = None) -> DeviceStatus:
        """The status now: the stored one, except that an online device whose deadline has
        passed is offline even before the sweeper (at most a sweep period away) says so."""
        if (
            self.status == DeviceStatus.ONLINE
            and self.offline_deadline is not None
            and (now or utcnow()) >= self.offline_deadline
        ):
            return DeviceStatus.OFFLINE
        return self.status


def redis_key(device_id: str) -> str:
    return KEY_PREFIX + device_id


def mirror(redis_client: Any, states: Iterable[DeviceState]) -> int:
    """Copy committed states to Redis in one round trip (sync client): the script runs by its
    hash, and is loaded once more only when Redis has lost it (a restart). Returns how many."""
    states = list(states)
    for attempt in (1, 2):
        pipe = redis_client.pipeline(transaction=False)
        for state in states:
            pipe.evalsha(
                _SET_IF_NEWER_SHA,
                1,
                redis_key(state.device_id),
                state.version,
                state.model_dump_json(),
            )
        try:
            pipe.execute()
            return len(states)
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            redis_client.script_load(_SET_IF_NEWER)  # then again: every write is idempotent
    return 0


def read(redis_client: Any, device_id: str) -> DeviceState | None:
    """The mirrored state of one device, or None when Redis does not have it."""
    raw = redis_client.hget(redis_key(device_id), "state")
    return DeviceState.model_validate_json(raw) if raw is not None else None


def rebuild(redis_client: Any, pages: Iterable[list[DeviceState]]) -> int:
    """Copy every device's state from PostgreSQL (in pages) and mark the mirror as rebuilt.

    Versioned writes make this safe beside live updates: a newer state is never overwritten.
    """
    count = sum(mirror(redis_client, page) for page in pages)
    redis_client.set(REBUILT_KEY, str(time.time()))
    return count


def is_rebuilt(redis_client: Any) -> bool:
    return bool(redis_client.exists(REBUILT_KEY))


class Breaker(retry.Breaker):
    """The Redis mirror behind a breaker: Redis only speeds reads up, so when it is down the
    mirror is skipped (and counted) rather than waited for."""

    def call(self, redis_call: Callable[[], T], *, service: str, skipped: str) -> T | None:
        """`redis_call()` unless Redis failed a moment ago; None (and a warning saying what was
        `skipped`) when it fails now."""

        def failed(exc: BaseException) -> None:
            metrics.REDIS_ERRORS.labels(service).inc()
            log.warning("Redis unavailable, %s: %s", skipped, exc)

        return self.attempt(redis_call, errors=redis.RedisError, on_error=failed)
