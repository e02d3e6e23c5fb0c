"""Connections to RabbitMQ: opened with the gateway's retry policy, robust afterwards."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aio_pika
import aio_pika.abc
from aio_pika.exceptions import AMQPError

from gateway.amqp import frames
from gateway.runtime.retry import Backoff

if TYPE_CHECKING:
    from gateway.amqp.publisher import Publisher

log = logging.getLogger(__name__)


async def connect(
    url: str, *, name: str, attempts: int = 10, max_delay: float = 5.0
) -> aio_pika.abc.AbstractRobustConnection:
    """Connect with capped exponential backoff and jitter; robust afterwards (reconnects).
    Frames are decoded whatever bytes they carry (see `gateway.amqp.frames`)."""
    frames.install()
    backoff = Backoff(0.2, max_delay)
    for attempt in range(1, attempts + 1):
        try:
            return await aio_pika.connect_robust(
                url, client_properties={"connection_name": name}, timeout=10, reconnect_interval=1
            )
        except (TimeoutError, OSError, AMQPError) as exc:
            if attempt == attempts:
                raise ConnectionError(
                    f"cannot reach RabbitMQ after {attempts} attempts: {exc!r}"
                ) from exc
            log.warning(
                "RabbitMQ unreachable (%r); %d attempts left, next in %.1f s",
                exc,
                attempts - attempt,
                backoff.ceiling,
            )
            await asyncio.sleep(backoff.next())
    raise AssertionError("unreachable")


def broker_ready(
    connection: aio_pika.abc.AbstractConnection | None, publisher: Publisher | None
) -> bool:
    """Connected, with a publishing channel open."""
    return (
        connection is not None
        and not connection.is_closed
        and publisher is not None
        and publisher.is_open
    )
