"""`gateway commands ...`: send, list, show and cancel commands, straight on the database.

A command stored here is announced like one sent over HTTP (NOTIFY): the api's dispatcher
publishes it at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

from pydantic import ValidationError

from gateway.contract.commands import DEFAULT_TTL_S, Command, CommandRequest, CommandStatus
from gateway.runtime.settings import CommonSettings
from gateway.storage import command_store
from gateway.storage.engine import make_engine


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("commands", help="send, list, show, cancel commands to devices")
    parser.set_defaults(func=run_commands)
    actions = parser.add_subparsers(dest="action", required=True)
    send = actions.add_parser("send", help="send a device a command; prints it")
    send.add_argument("device_id")
    send.add_argument("name")
    send.add_argument("--args", default="{}", help="a JSON object (default {})")
    send.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="seconds it stays live")
    listing = actions.add_parser("list", help="a device's commands, newest first")
    listing.add_argument("device_id")
    listing.add_argument("--status", choices=[s.value for s in CommandStatus])
    listing.add_argument("--limit", type=int, default=50)
    for action, text in (("show", "one command, as JSON"), ("cancel", "cancel a pending one")):
        actions.add_parser(action, help=text).add_argument("command_id", type=uuid.UUID)


def run_commands(args: argparse.Namespace) -> int:
    engine = make_engine(str(CommonSettings().database_url), pool_size=1)
    try:
        match args.action:
            case "send":
                request = CommandRequest(name=args.name, args=json.loads(args.args), ttl_s=args.ttl)
                with engine.begin() as conn:
                    _show(command_store.create(conn, args.device_id, request))
            case "list":
                status = CommandStatus(args.status) if args.status else None
                with engine.connect() as conn:
                    page = command_store.list_for_device(
                        conn, args.device_id, status=status, limit=args.limit
                    )
                print(f"{'id':<36}  {'name':<24} {'status':<10} created")
                for c in page.items:
                    created = c.created_at.isoformat(timespec="seconds")
                    print(f"{c.id}  {c.name:<24} {c.status:<10} {created}")
            case "show":
                with engine.connect() as conn:
                    command = command_store.get(conn, args.command_id)
                if command is None:
                    print(f"gateway: no command {args.command_id}", file=sys.stderr)
                    return 1
                _show(command)
            case "cancel":
                with engine.begin() as conn:
                    cancelled = command_store.cancel(conn, args.command_id)
                    command = cancelled or command_store.get(conn, args.command_id)
                if command is None:
                    print(f"gateway: no command {args.command_id}", file=sys.stderr)
                    return 1
                if cancelled is None:
                    pending = command.status == CommandStatus.PENDING
                    why = "being sent" if pending else command.status
                    print(
                        f"gateway: command {command.id} is {why}: only a pending "
                        "command can be cancelled",
                        file=sys.stderr,
                    )
                    return 1
                _show(cancelled)
    except (ValidationError, ValueError) as exc:
        print(f"gateway: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    except command_store.UnknownDevice as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


def _show(command: Command) -> None:
    print(command.model_dump_json(indent=2))
