"""Alembic environment: the database URL comes from the gateway's settings."""

from alembic import context
from sqlalchemy import create_engine

from gateway.runtime.settings import CommonSettings
from gateway.storage.schema import metadata

url = context.config.attributes.get("url") or str(CommonSettings().database_url)


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
