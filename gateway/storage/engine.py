"""Database engines, migrations, and how to tell a transient database error from a real one."""

from __future__ import annotations

import asyncio
from importlib.resources import files

import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from gateway.storage.partitions import DayTurned


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    pre_ping: bool = True,
    autocommit: bool = False,
    statement_timeout_ms: int = 0,
) -> Engine:
    """A pooled engine. `pre_ping` costs a round trip per checkout: right for occasional work,
    too dear for a request path (a dead connection there costs one 503 and is replaced) or a
    worker's batch (a dead connection fails the batch once, and the worker retries it).
    `autocommit` suits single-statement reads: no BEGIN and no ROLLBACK around them.
    `statement_timeout_ms` (0: none) bounds every statement of every connection; it travels in
    the connection's startup packet, so it costs no round trip at all."""
    connect_args: dict[str, object] = {
        "connect_timeout": 5,
        "application_name": "heartbeat-gateway",
    }
    if statement_timeout_ms:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return create_engine(
        url,
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args=connect_args,
    )


def alembic_config(url: str) -> Config:
    config = Config(str(files("gateway.storage") / "alembic.ini"))
    config.set_main_option("script_location", str(files("gateway.storage") / "migrations"))
    config.attributes["url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (idempotent)."""
    command.upgrade(alembic_config(url), revision)


#: SQLSTATE classes that say "not now" rather than "not this": connection exception,
#: insufficient resources, operator intervention (shutdown), transaction rollback (deadlock).
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "40"})


#: SQLSTATE of a statement cancelled, by `statement_timeout` or by an operator.
QUERY_CANCELED = "57014"


def is_cancelled(exc: SQLAlchemyError) -> bool:
    """The statement ran past `statement_timeout` (or was cancelled): the database is up."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "pgcode", None) == QUERY_CANCELED


def is_transient(exc: SQLAlchemyError) -> bool:
    """A lost connection or a database that is down: retry later, don't blame the message."""
    if isinstance(exc, PoolTimeout | DayTurned):
        return True
    if not isinstance(exc, DBAPIError):
        return False  # e.g. a value the driver cannot send: the message is at fault
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "pgcode", None)
    if code:
        return code[:2] in TRANSIENT_SQLSTATE_CLASSES
    return isinstance(exc, OperationalError | InterfaceError)  # no SQLSTATE: server unreachable


def short_error(exc: BaseException, limit: int = 300) -> str:
    """The first line of a database error (the driver's own message when there is one)."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


async def check_storage(engine: Engine, cache: redis.Redis) -> dict[str, bool]:
    """Can PostgreSQL and Redis answer right now? (Checked in threads, side by side.)"""

    def database() -> bool:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def ping() -> bool:
        try:
            return bool(cache.ping())
        except redis.RedisError:
            return False

    db_ok, redis_ok = await asyncio.gather(asyncio.to_thread(database), asyncio.to_thread(ping))
    return {"postgres": db_ok, "redis": redis_ok}
