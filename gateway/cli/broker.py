"""`gateway definitions` and `gateway tls init`: what the broker and the TLS listeners are
configured from."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    definitions = commands.add_parser(
        "definitions", help="print rabbitmq/definitions.json from the topology"
    )
    definitions.set_defaults(func=run_definitions)
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
    init.set_defaults(func=run_tls_init)
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


def run_definitions(args: argparse.Namespace) -> int:
    from gateway.amqp import accounts
    from gateway.amqp.topology import render_definitions

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


def run_tls_init(args: argparse.Namespace) -> int:
    from gateway.runtime import certificates

    hosts = [name for value in args.host for name in value.split(",")]
    files = certificates.ensure(args.out, hosts, owner=args.owner)
    if files.ca and files.ca.exists():
        print(f"CA (what clients trust): {files.ca}")
    print(f"server certificate:      {files.cert}")
    print(f"server key:              {files.key}")
    print(f"valid for: {', '.join(sorted(certificates.covered_names(files.cert)))}")
    return 0


def _owner(value: str) -> tuple[int, int]:
    uid, sep, gid = value.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise argparse.ArgumentTypeError(f"expected UID:GID (numbers), got {value!r}")
    return int(uid), int(gid)
