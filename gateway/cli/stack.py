"""`gateway stack ...`: the whole system on this machine, without Docker (a development tool:
the local stack lives in `gateway.devtools`, imported only when a subcommand needs it)."""

from __future__ import annotations

import argparse
import os
import sys


def register(commands: argparse._SubParsersAction) -> None:
    stack = commands.add_parser("stack", help="run the whole stack locally, without Docker")
    stack.set_defaults(func=run_stack, uses_local_stack_defaults=False)
    stack.add_argument("action", choices=["run", "up", "down", "status", "install"])
    stack.add_argument(
        "--name", choices=["dev", "test"], default="dev", help="which stack (ports differ)"
    )
    stack.add_argument("--infra-only", action="store_true", help="no bridge, worker or api")
    stack.add_argument(
        "--with-test-tools", action="store_true", help="install: also the test suite's clients"
    )


def run_stack(args: argparse.Namespace) -> int:
    from gateway.devtools.localstack import StackError

    try:
        return _run(args)
    except StackError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from gateway.devtools.localstack import (
        SYSTEM_PACKAGES,
        TEST_PACKAGES,
        LocalStack,
        require_system_packages,
    )

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


def local_stack_defaults() -> None:
    """Commands that reach the database, the broker or Redis use the `GATEWAY_*` settings; on
    a machine running the local stack, and with none given, they default to that stack's
    (its generated passwords live in `.run/dev/secrets/`)."""
    from gateway.amqp import accounts
    from gateway.devtools.localstack import LocalStack

    stack = LocalStack.dev()
    if not (stack.run_dir / "secrets").is_dir():
        return
    os.environ.setdefault("GATEWAY_DATABASE_URL", stack.database_url)
    os.environ.setdefault("GATEWAY_AMQP_URL", stack.amqp_url_for(accounts.API))
    os.environ.setdefault("GATEWAY_REDIS_URL", stack.redis_url)
    os.environ.setdefault("GATEWAY_BROKER_MANAGEMENT_URL", stack.management_api_url)
