"""The `gateway` command: run the local stack, migrate the database, manage devices, inspect
dead letters. Each group of subcommands lives in its own module and names its handler with
`set_defaults(func=...)`; a module's heavy imports happen inside its handler, so `--help` and
every deployment subcommand work in an install without extras."""

from __future__ import annotations

import argparse
import sys

from gateway import __version__
from gateway.cli import broker, commands, database, devices, rejected, simulate, stack

GROUPS = (stack, devices, commands, rejected, simulate, database, broker)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n\n")[0])
    root.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "uses_local_stack_defaults", True):
        stack.local_stack_defaults()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
