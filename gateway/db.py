"""Database engine and migrations."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": "heartbeat-gateway"},
    )


def alembic_config(url: str) -> Config:
    config = Config(str(files("gateway") / "alembic.ini"))
    config.set_main_option("script_location", str(files("gateway") / "migrations"))
    config.attributes["url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (idempotent)."""
    command.upgrade(alembic_config(url), revision)
