"""MQTT connect rate through the auth path, with and without RabbitMQ's auth cache.

Registers N devices, then connects each over MQTT (CONNECT, one QoS 1 heartbeat, DISCONNECT)
with a few clients in parallel, twice: the first pass is cold (every check asks the api), the
second warm (the cache, when on, answers permission checks). Logins always ask the api.
Runs on its own `bench` stack (loopback only) and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt

from gateway.devtools.localstack import LocalStack, running
from gateway.storage import registry
from gateway.storage.engine import make_engine

RESULTS = Path(__file__).parent / "results"
NO_CACHE = {"auth_backends.2.authz": "http"}


def register(stack: LocalStack, count: int, prefix: str) -> list[tuple[str, str]]:
    engine = make_engine(stack.database_url)
    devices = []
    with engine.begin() as conn:
        for i in range(count):
            issued, _ = registry.register(
                conn, registry.Registration(device_id=f"{prefix}-{i:04d}")
            )
            devices.append((issued.device_id, issued.token))
    engine.dispose()
    return devices


def connect_once(port: int, device_id: str, token: str, username: str | None = None) -> float:
    """Seconds from TCP connect to PUBACK of one heartbeat (as `username` when given)."""
    done = threading.Event()
    result: dict[str, object] = {}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(username or device_id, token)
    client.on_connect = lambda c, u, f, rc, p: (result.update(rc=rc), done.set())
    started = time.perf_counter()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        if not done.wait(10) or result["rc"].is_failure:
            raise RuntimeError(f"{device_id}: CONNECT refused ({result.get('rc')})")
        info = client.publish(f"devices/{device_id}/heartbeat", b"{}", qos=1)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            raise RuntimeError(f"{device_id}: no PUBACK")
        return time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()


def run_pass(
    port: int, devices: list[tuple[str, str]], parallel: int, username: str | None = None
) -> dict[str, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        latencies = sorted(pool.map(lambda d: connect_once(port, *d, username), devices))
    elapsed = time.perf_counter() - started
    return {
        "connects": len(devices),
        "seconds": round(elapsed, 3),
        "connects_per_s": round(len(devices) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
    }


def internal_user(stack: LocalStack) -> tuple[str, str]:
    """A RabbitMQ internal user allowed what devices are (this bench's stack only)."""
    user, password = "bench-internal", secrets.token_urlsafe(24)
    stack.management("PUT", f"/api/users/{user}", {"password": password, "tags": ""})
    stack.management(
        "PUT", f"/api/permissions/%2F/{user}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    return user, password


def measure(cache: bool, count: int, parallel: int) -> dict[str, object]:
    stack = LocalStack.bench()
    stack.rabbitmq_overrides = {} if cache else dict(NO_CACHE)
    stack.down(echo=False)  # the broker must start with this configuration
    with running(stack):
        devices = register(
            stack, count, f"bench-{'cache' if cache else 'nocache'}-{time.time_ns()}"
        )
        cold = run_pass(stack.ports.mqtt, devices, parallel)
        warm = run_pass(stack.ports.mqtt, devices, parallel)
        # The broker's own cost: the same connects as an internal user (no call to the api).
        user, password = internal_user(stack)
        internal = [(device_id, password) for device_id, _ in devices]
        baseline = run_pass(stack.ports.mqtt, internal, parallel, username=user)
    return {"auth_cache": cache, "cold": cold, "warm": warm, "internal_user": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=10)
    args = parser.parse_args()
    rows = [measure(cache, args.devices, args.parallel) for cache in (True, False)]
    print(f"MQTT connect + 1 QoS 1 heartbeat, {args.devices} devices, {args.parallel} in parallel")
    print(f"{'auth cache':<11} {'pass':<14} {'connects/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for row in rows:
        for name in ("cold", "warm", "internal_user"):
            r = row[name]
            print(
                f"{'on' if row['auth_cache'] else 'off':<11} {name:<14} "
                f"{r['connects_per_s']:>10} {r['p50_ms']:>8} {r['p99_ms']:>8}"
            )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-auth-connect.json"
    out.write_text(
        json.dumps({"devices": args.devices, "parallel": args.parallel, "runs": rows}, indent=2)
        + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
