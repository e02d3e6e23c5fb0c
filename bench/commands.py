"""The command round trip, against the heartbeat path in the same run.

Devices (paho, loopback only) subscribe to their commands and reply at once. Then:
  steady: operators `POST` commands at a fixed rate while the same devices publish QoS 1
    heartbeats; p50/p99 from the operator's send to the device's receipt and to the reply
    stored (the command's `finished_at`), and from a heartbeat's publish to its row stored;
  most: operators send as fast as `--senders` connections take them; round trips completed
    (replies stored) per second in the window.
Bounded in count and time; runs on its own `bench` stack (or the test stack, with
`--test-stack` and GATEWAY_TEST_PORT_OFFSET), and stops what it started.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from sqlalchemy import select

from gateway.devtools.localstack import LocalStack, running
from gateway.storage import registry
from gateway.storage.engine import make_engine
from gateway.storage.schema import commands, heartbeats

RESULTS = Path(__file__).parent / "results"


class Responder:
    def __init__(self, port: int, device_id: str, token: str, received: dict[str, float]):
        self.device_id, self.received = device_id, received
        ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(device_id, token)
        self.client.on_connect = lambda c, *a: c.subscribe(f"devices/{device_id}/commands", 1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.max_inflight_messages_set(200)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError(f"{device_id}: not subscribed")

    def _on_message(self, client, userdata, message) -> None:
        command_id = json.loads(message.payload)["id"]
        self.received.setdefault(command_id, time.time())
        body = json.dumps({"id": command_id, "status": "succeeded", "result": {}})
        client.publish(f"devices/{self.device_id}/replies", body, qos=1)

    def beat(self, msg_id: str) -> None:
        self.client.publish(
            f"devices/{self.device_id}/heartbeat", json.dumps({"msg_id": msg_id}), 1
        )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 1)


def run(stack: LocalStack, args: argparse.Namespace) -> dict:
    engine = make_engine(stack.database_url)
    prefix = f"benchcmd-{uuid.uuid4().hex[:6]}"
    with engine.begin() as conn:
        devices = [
            registry.register(conn, registry.Registration(device_id=f"{prefix}-{i:03d}"))[0]
            for i in range(args.devices)
        ]
    received: dict[str, float] = {}
    responders = [Responder(stack.ports.mqtt, d.device_id, d.token, received) for d in devices]
    token = stack.operator_token()
    # One client for every sender (thread-safe): a new one per request would cost its TLS
    # context, several times the request.
    client = httpx.Client(
        base_url=stack.api_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
        limits=httpx.Limits(max_connections=args.senders + 8),
    )
    posted: dict[str, float] = {}
    lock = threading.Lock()

    def post(n: int) -> None:
        device = devices[n % len(devices)]
        started = time.time()
        r = client.post(f"/api/v1/devices/{device.device_id}/commands", json={"name": "ping"})
        if r.status_code == 202:
            with lock:
                posted[r.json()["id"]] = started

    # warm-up: every path has carried a command (connections, caches, the auth cache)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, range(len(devices))))
    deadline = time.monotonic() + 30
    while len(received) < len(posted) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)
    posted.clear()

    # steady: commands at a fixed rate, heartbeats alongside
    beats: dict[str, float] = {}
    count = int(args.rate * args.seconds)
    with ThreadPoolExecutor(8) as pool:
        begin = time.monotonic()
        for n in range(count):
            time.sleep(max(0.0, begin + n / args.rate - time.monotonic()))
            pool.submit(post, n)
            responder = responders[n % len(responders)]
            msg_id = f"{prefix}-beat-{n}"
            beats[msg_id] = time.time()
            responder.beat(msg_id)
    steady = dict(posted)
    deadline = time.monotonic() + 30
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            rows = conn.execute(
                select(commands.c.id, commands.c.finished_at).where(
                    commands.c.id.in_([uuid.UUID(i) for i in steady]),
                    commands.c.status == "succeeded",
                )
            ).all()
            if len(rows) == len(steady):
                break
            time.sleep(0.5)
        stored = conn.execute(
            select(heartbeats.c.msg_id, heartbeats.c.stored_at).where(
                heartbeats.c.msg_id.in_(list(beats))
            )
        ).all()
    delivered = [received[i] - t for i, t in steady.items() if i in received]
    replied = [r.finished_at.timestamp() - steady[str(r.id)] for r in rows]
    beat_latency = [s.timestamp() - beats[m] for m, s in stored]

    # most: as fast as the senders go
    posted.clear()
    window_start = datetime.now(UTC)
    started = time.monotonic()
    with ThreadPoolExecutor(args.senders) as pool:
        n = 0
        while time.monotonic() - started < args.seconds:
            list(pool.map(post, range(n, n + args.senders * 4)))
            n += args.senders * 4
    window_end = datetime.now(UTC)
    time.sleep(5)  # the last replies land
    with engine.connect() as conn:
        done = conn.execute(
            select(commands.c.id).where(
                commands.c.id.in_([uuid.UUID(i) for i in posted]),
                commands.c.status == "succeeded",
                commands.c.finished_at.between(window_start, window_end),
            )
        ).all()
    seconds = (window_end - window_start).total_seconds()
    for r in responders:
        r.client.disconnect()
        r.client.loop_stop()
    client.close()
    engine.dispose()
    return {
        "devices": args.devices,
        "steady": {
            "commands_per_s": args.rate,
            "seconds": args.seconds,
            "commands": len(steady),
            "completed": len(replied),
            "to_device_p50_ms": pct(delivered, 0.5),
            "to_device_p99_ms": pct(delivered, 0.99),
            "round_trip_p50_ms": pct(replied, 0.5),
            "round_trip_p99_ms": pct(replied, 0.99),
            "heartbeats": len(beats),
            "heartbeats_stored": len(beat_latency),
            "heartbeat_p50_ms": pct(beat_latency, 0.5),
            "heartbeat_p99_ms": pct(beat_latency, 0.99),
            "round_trip_mean_ms": round(statistics.mean(replied) * 1000, 1),
        },
        "most": {
            "senders": args.senders,
            "posted": len(posted),
            "completed_in_window": len(done),
            "round_trips_per_s": round(len(done) / seconds, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20.0, help="steady commands per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--test-stack", action="store_true", help="the test stack instead")
    args = parser.parse_args()
    stack = LocalStack.test() if args.test_stack else LocalStack.bench()
    with running(stack):
        result = run(stack, args)
    s, m = result["steady"], result["most"]
    print(f"commands, {args.devices} MQTT devices replying at once")
    print(
        f"steady {s['commands_per_s']}/s: to device p50 {s['to_device_p50_ms']} ms, "
        f"p99 {s['to_device_p99_ms']} ms; reply stored p50 {s['round_trip_p50_ms']} ms, "
        f"p99 {s['round_trip_p99_ms']} ms ({s['completed']}/{s['commands']} completed)"
    )
    print(
        f"heartbeats alongside: publish to stored p50 {s['heartbeat_p50_ms']} ms, "
        f"p99 {s['heartbeat_p99_ms']} ms ({s['heartbeats_stored']}/{s['heartbeats']} stored)"
    )
    print(f"most: {m['round_trips_per_s']} round trips/s with {m['senders']} operator senders")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-commands.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
