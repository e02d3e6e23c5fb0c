"""What request handlers need, opened once per process in the app's lifespan."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import aio_pika.abc
import redis
from fastapi import Request
from sqlalchemy import Engine

from gateway.broker import Publisher
from gateway.settings import ApiSettings
from gateway.state import Breaker

log = logging.getLogger(__name__)


@dataclass
class Context:
    settings: ApiSettings
    engine: Engine
    redis: redis.Redis
    connection: aio_pika.abc.AbstractRobustConnection
    publisher: Publisher
    redis_breaker: Breaker = field(default_factory=Breaker)


def context(request: Request) -> Context:
    return request.app.state.context
