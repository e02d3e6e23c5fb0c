"""`gateway rejected list|replay`: dead letters from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from datetime import datetime

from gateway.amqp.connection import connect
from gateway.amqp.publisher import Publisher, PublishFailed
from gateway.contract.messages import show_bytes
from gateway.runtime.settings import CommonSettings
from gateway.storage import replay
from gateway.storage.engine import make_engine


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "rejected", help="list and replay dead letters (GATEWAY_DATABASE_URL)"
    )
    parser.set_defaults(func=run_rejected)
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("list", "dead letters, oldest first"),
        ("replay", "put dead letters back through the pipeline once the cause is fixed"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("--device", help="only this device's")
        action.add_argument("--reason", help="only this reason, e.g. unstorable")
        action.add_argument("--since", type=datetime.fromisoformat, help="received at or after")
        action.add_argument("--until", type=datetime.fromisoformat, help="received before")
        action.add_argument("--id", action="append", type=uuid.UUID, default=[], dest="ids")
        action.add_argument("--limit", type=int, default=1000)
        action.add_argument(
            "--include-replayed", action="store_true", help="also entries replayed before"
        )
        if name == "replay":
            action.add_argument("--dry-run", action="store_true", help="say what would happen")


def run_rejected(args: argparse.Namespace) -> int:
    settings = CommonSettings()
    filters = replay.Filters(
        device_id=args.device,
        reason=args.reason,
        since=args.since,
        until=args.until,
        ids=tuple(args.ids),
        include_replayed=args.include_replayed,
        limit=args.limit,
    )
    engine = make_engine(str(settings.database_url), pool_size=1)
    try:
        with engine.connect() as conn:
            entries = replay.select_entries(conn, filters)
        if args.action == "list":
            for e in entries:
                replayed = (
                    f" (replayed {e['replayed_at']:%Y-%m-%d %H:%M})" if e["replayed_at"] else ""
                )
                print(
                    f"{e['id']}  {e['received_at']:%Y-%m-%d %H:%M:%S}  {e['source']:<10} "
                    f"{e['device_id'] or '-':<24} {e['reason']:<18} {e['detail'][:70]}{replayed}"
                )
                print(f"    {show_bytes(e['payload'])[:120]!r}")
            print(f"{len(entries)} dead letters")
            return 0
        plan = replay.plan(entries)
        for entry_id, why in plan.still_invalid:
            print(f"still invalid, kept: {entry_id}  {why}")
        if args.dry_run:
            print(f"{len(plan.ready)} would be replayed, {len(plan.still_invalid)} still invalid")
            return 0
        replayed = asyncio.run(_publish(str(settings.amqp_url), plan))
        with engine.begin() as conn:
            replay.mark_replayed(conn, replayed)
        print(f"replayed {len(replayed)}, still invalid {len(plan.still_invalid)}")
        return 0 if len(replayed) == len(plan.ready) else 1
    finally:
        engine.dispose()


async def _publish(amqp_url: str, plan: replay.Plan) -> list[uuid.UUID]:
    """Publish each ready message with the broker's confirm; returns the ids that made it."""
    connection = await connect(amqp_url, name="gateway-replay", attempts=3)
    done = []
    try:
        publisher = await Publisher.open(connection, timeout=10)
        for entry_id, message in plan.ready:
            try:
                await publisher.publish_work(message)
            except PublishFailed as exc:
                print(f"not replayed (broker): {entry_id}  {exc}", file=sys.stderr)
                continue
            done.append(entry_id)
    finally:
        await connection.close()
    return done
