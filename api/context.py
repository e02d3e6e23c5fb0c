"""What request handlers need, opened once per process in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
from api.dispatcher import Dispatcher
from api.stream import StatusStream
from api.tokens import TokenCache
from gateway.amqp.connection import connect
from gateway.amqp.publisher import Forwarder, Publisher
from gateway.contract.topics import DEVICE_ID_PATTERN, DEVICE_ID_RULE
from gateway.runtime.settings import ApiSettings
from gateway.storage.engine import make_engine
from gateway.storage.mirror import Breaker

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


@asynccontextmanager
async def open_context(settings: ApiSettings) -> AsyncIterator[Context]:
    """The connections of one api process, for as long as it serves."""
    # Every statement of the api is bounded: a read that would run for minutes answers 503
    # instead of holding a pooled connection (and a thread) for as long.
    timeout_ms = settings.api_statement_timeout_ms
    engine = make_engine(
        str(settings.database_url), pool_size=4, pre_ping=False, statement_timeout_ms=timeout_ms
    )
    reads = make_engine(
        str(settings.database_url),
        pool_size=10,
        pre_ping=False,
        autocommit=True,
        statement_timeout_ms=timeout_ms,
    )
    cache = redis.Redis.from_url(
        str(settings.redis_url), socket_timeout=1, socket_connect_timeout=1
    )
    connection = await connect(str(settings.amqp_url), name="gateway-api")
    try:
        publisher = await Publisher.open(connection, timeout=settings.api_confirm_timeout_s)
        tokens = TokenCache()
        hub = CommandHub(Dispatcher(engine, publisher))
        stream = StatusStream(engine.url, tokens, hub)
        stream.start()
        forwarder = Forwarder(
            publisher, size=settings.api_batch_size, linger_s=settings.api_linger_ms / 1000
        )
        stopping = asyncio.Event()
        dispatching = asyncio.create_task(hub.dispatcher.run(stopping), name="commands:dispatcher")
        try:
            yield Context(
                settings,
                engine,
                cache,
                connection,
                publisher,
                stream,
                reads,
                forwarder,
                tokens=tokens,
                commands=hub,
            )
        finally:
            stopping.set()
            await dispatching
            stream.stop()
    finally:
        await connection.close()
        engine.dispose()
        reads.dispose()
        cache.close()


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
