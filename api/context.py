"""What request handlers need, opened once per process in the app's lifespan."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated

import aio_pika.abc
import redis
from fastapi import Path, Request
from pydantic import AfterValidator
from sqlalchemy import Engine

from api.stream import StatusStream
from api.tokens import TokenCache
from gateway.broker import Forwarder, Publisher
from gateway.settings import ApiSettings
from gateway.state import Breaker
from gateway.topics import DEVICE_ID_PATTERN, DEVICE_ID_RULE

log = logging.getLogger(__name__)


@dataclass
class Context:
    settings: ApiSettings
    engine: Engine
    redis: redis.Redis
    connection: aio_pika.abc.AbstractRobustConnection
    publisher: Publisher
    stream: StatusStream
    #: A pool of autocommit connections for reads: one round trip each (no BEGIN, no ROLLBACK).
    reads: Engine
    #: Groups concurrent HTTP heartbeats into one work message (each waits for its confirm).
    forwarder: Forwarder
    redis_breaker: Breaker = field(default_factory=Breaker)
    #: Device tokens already checked (evicted on any credential change).
    tokens: TokenCache = field(default_factory=TokenCache)


async def context(request: Request) -> Context:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request.
    return request.app.state.context


#: A device id in a path, validated (and documented) by its grammar.
DevicePath = Annotated[
    str, Path(pattern=DEVICE_ID_PATTERN, description=f"device id: {DEVICE_ID_RULE}")
]


def _utc(value: datetime) -> datetime:
    """Query times as UTC (naive ones are taken as UTC), within what PostgreSQL can compare."""
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time is out of range") from None
    if not 1 <= value.year <= 9999:
        raise ValueError("time is out of range")
    return value


#: A time in a query (`since`, `until`), normalized to UTC.
QueryTime = Annotated[datetime | None, AfterValidator(lambda v: None if v is None else _utc(v))]
