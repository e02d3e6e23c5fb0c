"""Alembic environment: the database URL comes from the gateway's settings."""

from alembic import context
from sqlalchemy import create_engine

from gateway.runtime.settings import CommonSettings
from gateway.storage.partitions import NAME_RE
from gateway.storage.schema import metadata

url = context.config.attributes.get("url") or str(CommonSettings().database_url)


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """What autogenerate and `alembic check` compare: everything but the daily partitions of
    `heartbeats` (made at run time by `gateway maintain`, not by a migration) and their
    indexes, which PostgreSQL copies from the parent's."""
    table = obj.table.name if type_ == "index" else name
    return not (reflected and type_ in ("table", "index") and NAME_RE.match(table or ""))


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=metadata, include_object=include_object
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
