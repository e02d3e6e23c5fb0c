"""What request handlers need, opened once per process in the app's lifespan."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated

import aio_pika.abc
import redis
from fastapi import Path, Query, Request
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError
from sqlalchemy import Engine

from api.command_hub import CommandHub
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
    #: Devices with live commands, long-polls waiting, the dispatcher (`api.command_hub`).
    commands: CommandHub = field(default_factory=CommandHub)


async def context(request: Request) -> Context:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request.
    return request.app.state.context


#: A device id in a path, validated (and documented) by its grammar.
DevicePath = Annotated[
    str, Path(pattern=DEVICE_ID_PATTERN, description=f"device id: {DEVICE_ID_RULE}")
]


#: The range of every time in a query, in UTC once its offset is applied: every instant that
#: a date-time of the years 1 to 9999 names. Outside it: 422, naming the parameter.
TIME_RANGE = "from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"
TIME_DESCRIPTION = f"RFC 3339 (UTC when without offset), {TIME_RANGE} once in UTC"


def _utc(value: datetime | None) -> datetime | None:
    """A query time as UTC (a naive one is taken as UTC), or the error that states its range."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):  # e.g. 0001-01-01T00:00:00+01:00 is in the year 0
        raise PydanticCustomError(
            "time_range", f"must be a time {TIME_RANGE} once converted to UTC"
        ) from None


#: A window's start in a query (inclusive), normalized to UTC.
Since = Annotated[
    datetime | None,
    AfterValidator(_utc),
    Query(description=f"received at or after this time, {TIME_DESCRIPTION}"),
]
#: A window's end in a query (exclusive), normalized to UTC.
Until = Annotated[
    datetime | None,
    AfterValidator(_utc),
    Query(description=f"received before this time, {TIME_DESCRIPTION}"),
]
