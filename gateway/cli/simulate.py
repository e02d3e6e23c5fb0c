"""`gateway simulate`: a fleet of simulated devices against a running stack."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from gateway.runtime.settings import CommonSettings
from gateway.storage import registry
from gateway.storage.engine import make_engine

if TYPE_CHECKING:
    from gateway.devtools.simulate import Credentials


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("simulate", help="simulated devices sending realistic heartbeats")
    parser.set_defaults(func=run_simulate)
    parser.add_argument("--devices", type=int, default=10, help="how many devices (default 10)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between heartbeats")
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument("--mqtt", dest="transport", action="store_const", const="mqtt")
    transport.add_argument("--http", dest="transport", action="store_const", const="http")
    parser.set_defaults(transport="mqtt")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    parser.add_argument("--will", action="store_true", help="connect with Last Will 'offline'")
    parser.add_argument("--prefix", default="sim", help="device ids are <prefix>-0001, ...")
    parser.add_argument("--mqtt-port", type=int, default=1884)
    parser.add_argument("--api-url", default="http://127.0.0.1:8000")


def provision(
    settings: CommonSettings, prefix: str, count: int, interval: float
) -> list[Credentials]:
    """Register the devices (or issue new tokens to ones already registered)."""
    # The simulator (httpx) is a developer tool: imported when used, so the service image,
    # built without the dev extras, runs every other `gateway` command.
    from gateway.devtools.simulate import Credentials

    engine = make_engine(str(settings.database_url), pool_size=1)
    creds = []
    try:
        with engine.begin() as conn:
            for i in range(1, count + 1):
                device_id = f"{prefix}-{i:04d}"
                try:
                    issued, _ = registry.register(
                        conn,
                        registry.Registration(
                            device_id=device_id, heartbeat_interval_s=max(1, round(interval))
                        ),
                    )
                except registry.DeviceExists:
                    issued, _ = registry.rotate(conn, device_id)
                creds.append(Credentials(issued.device_id, issued.token))
    finally:
        engine.dispose()
    return creds


def run_simulate(args: argparse.Namespace) -> int:
    # The simulator needs the `simulate` extra (httpx): imported here, so that the rest of the
    # command works in an install without extras.
    try:
        from gateway.devtools.simulate import Simulation, Tally
    except ImportError as exc:
        print(
            f"gateway simulate needs the simulate extra ({exc.name} is missing): "
            "pip install 'heartbeat-gateway[simulate]'",
            file=sys.stderr,
        )
        return 2

    settings = CommonSettings()
    creds = provision(settings, args.prefix, args.devices, args.interval)
    print(
        f"{args.devices} devices ({args.prefix}-0001...) over {args.transport.upper()}, "
        f"a heartbeat every {args.interval:g} s each, for {args.duration:g} s",
        flush=True,
    )
    simulation = Simulation(
        creds,
        interval_s=args.interval,
        transport=args.transport,
        mqtt_port=args.mqtt_port,
        api_url=args.api_url,
        will=args.will,
    )
    started = time.monotonic()

    def progress(tally: Tally, elapsed: float) -> None:
        rate = len(tally.acked) / elapsed if elapsed else 0.0
        sys.stdout.write(
            f"\r  {elapsed:5.0f} s  sent {len(tally.sent):>8}  acked {len(tally.acked):>8}  "
            f"refused {tally.refused:>5}  errors {tally.errors:>5}  {rate:8.1f}/s"
        )
        sys.stdout.flush()

    try:
        tally = simulation.run_for(args.duration, progress)
    except KeyboardInterrupt:
        tally = simulation.stop()
    elapsed = time.monotonic() - started
    print(
        f"\nsent {len(tally.sent)}, acknowledged {len(tally.acked)} "
        f"({len(tally.acked) / max(elapsed, 1e-9):.1f}/s), refused {tally.refused}, "
        f"errors {tally.errors}, unacknowledged {len(tally.sent) - len(tally.acked)}"
    )
    return 0
