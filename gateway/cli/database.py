"""`gateway migrate` and `gateway maintain`: the schema, partitions and retention."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "migrate", help="apply database migrations (GATEWAY_DATABASE_URL)"
    ).set_defaults(func=run_migrate)
    commands.add_parser(
        "maintain",
        help="create heartbeat partitions ahead, drop those past GATEWAY_RETENTION_DAYS; "
        "delete dead letters and status events past GATEWAY_DEAD_LETTER_RETENTION_DAYS and "
        "GATEWAY_EVENT_RETENTION_DAYS",
    ).set_defaults(func=run_maintain)


def run_migrate(args: argparse.Namespace) -> int:
    from gateway.runtime.settings import CommonSettings
    from gateway.storage.engine import migrate

    migrate(str(CommonSettings().database_url))
    print("database schema is up to date")
    return 0


def run_maintain(args: argparse.Namespace) -> int:
    from gateway.runtime.settings import WorkerSettings, load
    from gateway.storage import partitions, retention
    from gateway.storage.engine import make_engine

    settings = load(WorkerSettings)
    engine = make_engine(str(settings.database_url), pool_size=1)
    try:
        done = partitions.run(
            engine,
            ahead_days=settings.partitions_ahead_days,
            retention_days=settings.retention_days,
        )
        purged = retention.run(
            engine,
            dead_letter_days=settings.dead_letter_retention_days,
            event_days=settings.event_retention_days,
        )
    finally:
        engine.dispose()
    print(
        f"partitions created: {', '.join(done.created) or 'none'}; "
        f"dropped: {', '.join(done.dropped) or 'none'}"
        + ("; another maintenance run holds the lock, nothing done" if done.skipped else "")
    )
    deleted = purged.deleted
    print(
        f"deleted: {deleted.get('rejected', 0)} dead letters, "
        f"{deleted.get('device_events', 0)} status events"
        + ("; another run holds the retention lock, left to it" if purged.skipped else "")
    )
    return 0
