"""The `gateway` command: run the local stack, migrate the database, inspect dead letters."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gateway import accounts
from gateway.localstack import (
    SYSTEM_PACKAGES,
    TEST_PACKAGES,
    LocalStack,
    StackError,
    require_system_packages,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="run the whole stack locally, without Docker")
    stack.add_argument("action", choices=["run", "up", "down", "status", "install"])
    stack.add_argument(
        "--name", choices=["dev", "test"], default="dev", help="which stack (ports differ)"
    )
    stack.add_argument("--infra-only", action="store_true", help="no bridge, worker or api")
    stack.add_argument(
        "--with-test-tools", action="store_true", help="install: also the test suite's clients"
    )

    devices = commands.add_parser(
        "devices", help="register devices and manage their tokens (GATEWAY_DATABASE_URL)"
    )
    device_commands = devices.add_subparsers(dest="action", required=True)
    add = device_commands.add_parser("add", help="register a device; prints its token once")
    add.add_argument("device_id")
    add.add_argument("--interval", type=int, default=30, help="heartbeat interval in seconds")
    device_commands.add_parser("list", help="all devices, with status and last seen")
    for action, text in (
        ("rotate", "issue a new token; the old one stops working at once"),
        ("disable", "refuse the device's logins and heartbeats"),
        ("enable", "accept the device again"),
    ):
        device_commands.add_parser(action, help=text).add_argument("device_id")

    from gateway.rejected_cli import add_arguments as rejected_arguments

    rejected_arguments(
        commands.add_parser("rejected", help="list and replay dead letters (GATEWAY_DATABASE_URL)")
    )

    from gateway.commands_cli import add_arguments as commands_arguments

    commands_arguments(
        commands.add_parser("commands", help="send, list, show, cancel commands to devices")
    )

    from gateway.simulate_cli import add_arguments as simulate_arguments

    simulate_arguments(
        commands.add_parser("simulate", help="simulated devices sending realistic heartbeats")
    )

    commands.add_parser("migrate", help="apply database migrations (GATEWAY_DATABASE_URL)")
    commands.add_parser(
        "maintain",
        help="create heartbeat partitions ahead, drop those past GATEWAY_RETENTION_DAYS; "
        "delete dead letters and status events past GATEWAY_DEAD_LETTER_RETENTION_DAYS and "
        "GATEWAY_EVENT_RETENTION_DAYS",
    )
    definitions = commands.add_parser(
        "definitions", help="print rabbitmq/definitions.json from the topology"
    )
    definitions.add_argument(
        "--accounts",
        action="store_true",
        help="with the broker accounts, from GATEWAY_BROKER_<ACCOUNT>_PASSWORD (compose)",
    )
    definitions.add_argument(
        "--topology", help="the topology from this file (default: the one the code declares)"
    )
    definitions.add_argument("--out", help="write to this file instead of standard output")

    tls = commands.add_parser("tls", help="certificates for the TLS listeners")
    tls_commands = tls.add_subparsers(dest="action", required=True)
    init = tls_commands.add_parser(
        "init",
        help="write a CA and a server certificate into a folder, once (renewed when near expiry "
        "or short of a host name; a folder without ca-key.pem holds your own and is left alone)",
    )
    init.add_argument("--out", type=Path, required=True, help="the folder to write into")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        help="DNS names or IP addresses clients connect to (repeatable, or comma-separated); "
        "localhost, 127.0.0.1 and ::1 are always covered",
    )
    init.add_argument(
        "--owner",
        type=_owner,
        help="UID:GID to own ca.pem, server.pem and server-key.pem; the key is then readable by "
        "the group too (needs root)",
    )

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except StackError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1


def _local_stack_defaults() -> None:
    """Commands that reach the database, the broker or Redis use the `GATEWAY_*` settings; on
    a machine running the local stack, and with none given, they default to that stack's
    (its generated passwords live in `.run/dev/secrets/`)."""
    stack = LocalStack.dev()
    if not (stack.run_dir / "secrets").is_dir():
        return
    os.environ.setdefault("GATEWAY_DATABASE_URL", stack.database_url)
    os.environ.setdefault("GATEWAY_AMQP_URL", stack.amqp_url_for(accounts.API))
    os.environ.setdefault("GATEWAY_REDIS_URL", stack.redis_url)
    os.environ.setdefault("GATEWAY_BROKER_MANAGEMENT_URL", stack.management_api_url)


def _run(args: argparse.Namespace) -> int:
    if args.command != "stack":
        _local_stack_defaults()
    if args.command == "stack":
        stack = LocalStack.test() if args.name == "test" else LocalStack.dev()
        match args.action:
            case "run":
                stack.run()
            case "up":
                stack.up(apps=not args.infra_only)
            case "down":
                stack.down()
            case "status":
                for name, pid in stack.status().items():
                    print(f"{name:9} {'running, pid ' + str(pid) if pid else 'stopped'}")
            case "install":
                packages = {**SYSTEM_PACKAGES, **(TEST_PACKAGES if args.with_test_tools else {})}
                require_system_packages(packages)
        return 0
    if args.command == "devices":
        from gateway.devices_cli import run_devices

        return run_devices(args)
    if args.command == "commands":
        from gateway.commands_cli import run_commands

        return run_commands(args)
    if args.command == "rejected":
        from gateway.rejected_cli import run_rejected

        return run_rejected(args)
    if args.command == "simulate":
        from gateway.simulate_cli import run_simulate

        return run_simulate(args)
    if args.command == "migrate":
        from gateway.db import migrate
        from gateway.settings import CommonSettings

        migrate(str(CommonSettings().database_url))
        print("database schema is up to date")
        return 0
    if args.command == "maintain":
        from gateway import partitions, retention
        from gateway.db import make_engine
        from gateway.settings import WorkerSettings, load

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
    if args.command == "tls":
        from gateway import certificates

        hosts = [name for value in args.host for name in value.split(",")]
        files = certificates.ensure(args.out, hosts, owner=args.owner)
        if files.ca and files.ca.exists():
            print(f"CA (what clients trust): {files.ca}")
        print(f"server certificate:      {files.cert}")
        print(f"server key:              {files.key}")
        print(f"valid for: {', '.join(sorted(certificates.covered_names(files.cert)))}")
        return 0
    if args.command == "definitions":
        from gateway.topology import render_definitions

        try:
            text = Path(args.topology).read_text() if args.topology else render_definitions()
            if args.accounts:
                passwords = accounts.passwords_from_environment()
                text = accounts.render(json.loads(text), passwords)
        except ValueError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1
        if args.out:
            Path(args.out).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    return 2


def _owner(value: str) -> tuple[int, int]:
    uid, sep, gid = value.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise argparse.ArgumentTypeError(f"expected UID:GID (numbers), got {value!r}")
    return int(uid), int(gid)


if __name__ == "__main__":
    sys.exit(main())
