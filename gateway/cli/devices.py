"""`gateway devices ...`: the device registry from a terminal, straight on the database."""

from __future__ import annotations

import argparse
import contextlib
import sys

import redis
from pydantic import ValidationError

from gateway.amqp import sessions
from gateway.runtime.settings import CommonSettings
from gateway.storage import mirror, reads, registry
from gateway.storage.engine import make_engine


def register(commands: argparse._SubParsersAction) -> None:
    devices = commands.add_parser(
        "devices", help="register devices and manage their tokens (GATEWAY_DATABASE_URL)"
    )
    devices.set_defaults(func=run_devices)
    actions = devices.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a device; prints its token once")
    add.add_argument("device_id")
    add.add_argument("--interval", type=int, default=30, help="heartbeat interval in seconds")
    actions.add_parser("list", help="all devices, with status and last seen")
    for action, text in (
        ("rotate", "issue a new token; the old one stops working at once"),
        ("disable", "refuse the device's logins and heartbeats"),
        ("enable", "accept the device again"),
    ):
        actions.add_parser(action, help=text).add_argument("device_id")


def run_devices(args: argparse.Namespace) -> int:
    settings = CommonSettings()
    engine = make_engine(str(settings.database_url), pool_size=1)
    try:
        if args.action == "list":
            return _list(engine, settings)
        with engine.begin() as conn:
            match args.action:
                case "add":
                    issued, device = registry.register(
                        conn,
                        registry.Registration(
                            device_id=args.device_id, heartbeat_interval_s=args.interval
                        ),
                    )
                case "rotate":
                    issued, device = registry.rotate(conn, args.device_id)
                case "disable" | "enable":
                    issued = None
                    device = registry.change(
                        conn,
                        args.device_id,
                        registry.DeviceChanges(enabled=args.action == "enable"),
                    )
        _mirror(settings, device)
        if args.action in ("rotate", "disable"):
            sessions.close_sessions(settings.broker_management_url, device.device_id)
    except ValidationError as exc:
        print(f"gateway: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 1
    except registry.RegistryError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if issued is None:
        print(f"{device.device_id}: {'enabled' if device.enabled else 'disabled'}")
        return 0
    print(f"device    {issued.device_id}")
    print(f"token     {issued.token}")
    print(f"interval  {issued.heartbeat_interval_s} s")
    print(issued.note)
    print("\nMQTT: username = device id, password = token, e.g.")
    print(
        f"  mosquitto_pub -h 127.0.0.1 -p 1884 -q 1 -i {issued.device_id} -u {issued.device_id} "
        f"-P '{issued.token}' -t devices/{issued.device_id}/heartbeat -m '{{\"seq\":1}}'"
    )
    print("HTTP:")
    print(
        f"  curl -X POST http://127.0.0.1:8000/api/v1/devices/{issued.device_id}/heartbeats "
        f"-H 'Authorization: Bearer {issued.token}' -H 'Content-Type: application/json' "
        "-d '{\"seq\":1}'"
    )
    return 0


def _list(engine, settings: CommonSettings) -> int:
    cursor = None
    print(f"{'device':<32} {'status':<11} {'enabled':<8} {'interval':>8}  last seen")
    with engine.connect() as conn:
        while True:
            page = reads.list_devices(conn, cursor=cursor, limit=1000)
            for d in page.items:
                seen = d.last_seen.isoformat(timespec="seconds") if d.last_seen else "-"
                print(
                    f"{d.device_id:<32} {d.status:<11} {'yes' if d.enabled else 'no':<8} "
                    f"{d.heartbeat_interval_s:>7}s  {seen}"
                )
            if page.next_cursor is None:
                return 0
            cursor = page.next_cursor


def _mirror(settings: CommonSettings, device: mirror.DeviceState) -> None:
    """Keep the api's Redis read path current (best effort; nothing breaks without it)."""
    client = redis.Redis.from_url(
        str(settings.redis_url), socket_timeout=1, socket_connect_timeout=1
    )
    with contextlib.suppress(redis.RedisError):
        mirror.mirror(client, [device])
    client.close()
