"""Helpers for tests: polling with deadlines, unique names, running services in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() == "true"
OPERATOR_TOKEN = "test-operator-token-" + uuid.uuid4().hex


@dataclass(frozen=True)
class Device:
    device_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)")
    pytest.skip(reason)


def poll(check: Callable[[], T], *, timeout: float = 15.0, what: str = "condition") -> T:
    """Call `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def unique(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def apoll(check: Callable[[], Any], *, timeout: float = 15.0, what: str = "condition") -> Any:
    """`poll` for tests that run services in their own event loop: sleeps without blocking it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@contextlib.asynccontextmanager
async def serving(service: Any, timeout: float = 20.0) -> AsyncIterator[Any]:
    """Run `service.serve(stop)` in this loop until the block ends, then stop it cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.serve(stop), name=f"serve:{type(service).__name__}")

    async def ready() -> bool:
        if task.done():
            task.result()  # raises what made it stop
        return all((await service.ready()).values())

    await apoll(ready, timeout=timeout, what=f"{type(service).__name__} ready")
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


SEED_SHAPE = {
    "device_uuid": "0b9f4f0e-1f7c-4c1e-9a57-8d3f5d9c2a11",
    "cpu_usage": 31.2,
    "ram_usage": 48.0,
    "disk_free": 120.5,
    "temperature": 51.3,
    "latency": 23.0,
    "connectivity": 1,
    "boot_date": "2026-11-20T08:00:00Z",
}


@contextlib.contextmanager
def mqtt_session(mqtt_port: int, device: Device) -> Iterator[Any]:
    """A connected MQTT client of `device` (paho, QoS 1 ready), closed afterwards."""
    from gateway.devtools.simulate import Credentials, MqttDevice, Tally

    sim = MqttDevice(
        Credentials(device.device_id, device.token),
        "127.0.0.1",
        mqtt_port,
        Tally(),
        rng=random.Random(0),
    )
    try:
        poll(sim.client.is_connected, what="MQTT connected")
        yield sim.client
    finally:
        sim.close()


def history(api: Any, device_id: str) -> list[dict]:
    """A device's stored heartbeats, newest first ([] while it has none or is unknown)."""
    response = api.get(f"/api/v1/devices/{device_id}/heartbeats")
    return response.json()["items"] if response.status_code == 200 else []


def publish_acked(client: Any, topic: str, body: bytes) -> bool:
    """Publish with QoS 1; True once the broker acknowledged it."""
    info = client.publish(topic, body, qos=1)
    try:
        info.wait_for_publish(timeout=10)
    except (RuntimeError, ValueError):
        return False
    return info.is_published()


def assert_stored_as_sent(engine: Any, sent: Any, zone: str) -> None:
    """Store heartbeat `sent` twice (one row), read it back in session time zone `zone`, and
    find it as it was sent (a whole float may come back from jsonb as an int: the same number).
    Nothing is kept (the transaction is rolled back)."""
    from pydantic import TypeAdapter
    from sqlalchemy import select, text

    from gateway.contract.messages import Heartbeat
    from gateway.contract.payload import StoredMetricValue
    from gateway.storage import writes
    from gateway.storage.schema import heartbeats

    with engine.connect() as conn, conn.begin() as transaction:
        conn.execute(text("SELECT set_config('TimeZone', :zone, true)"), {"zone": zone})
        assert writes.write_batch(conn, [sent, sent]).inserted == 1
        row = conn.execute(select(heartbeats).where(heartbeats.c.id == sent.id)).mappings().one()
        transaction.rollback()
    got = Heartbeat.model_validate({**row, "metrics": {}})
    assert got == sent.model_copy(update={"metrics": {}})
    metrics = TypeAdapter(dict[str, StoredMetricValue]).validate_python(row["metrics"])
    assert metrics.keys() == sent.metrics.keys()
    for name, value in sent.metrics.items():
        if isinstance(value, float):
            assert float(metrics[name]) == value, name
        else:
            assert metrics[name] == value and type(metrics[name]) is type(value), name


def statements_run_by(engine: Any, run: Callable[[Any], Any]) -> list[tuple[str, Any]]:
    """The SQL `run(conn)` sends to PostgreSQL, captured on its way to the driver, with its
    parameters (to EXPLAIN the very statements the code runs); the transaction is rolled
    back."""
    from sqlalchemy import event

    captured: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        captured.append((statement, parameters))

    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", capture)
        with conn.begin() as transaction:
            run(conn)
            transaction.rollback()
        event.remove(conn, "before_cursor_execute", capture)
    return captured


def plan_of(engine: Any, statement: str, parameters: Any) -> str:
    """PostgreSQL's plan (EXPLAIN, not run) of a statement captured by `statements_run_by`."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).all()
        conn.rollback()
    return "\n".join(row[0] for row in rows)


def run_readme_blocks(stack: Any, *markers: str) -> tuple[str, subprocess.CompletedProcess]:
    """Run the README's shell blocks marked `<!-- marker -->`, in order, as written, against the
    test stack: its ports, its operator token, and a device of its own instead of `pump-7`.
    Returns that device's id and what bash printed."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [readme.split(f"<!-- {m} -->\n```sh\n", 1)[1].split("```", 1)[0] for m in markers]
    device = unique("pump")
    token_file = stack.run_dir / "operator-token.readme"
    script = (
        "".join(blocks)
        .replace(".run/dev/operator-token", str(token_file))
        .replace("pump-7", device)
        .replace("127.0.0.1:8000", f"127.0.0.1:{stack.ports.api}")
        .replace("-p 1884", f"-p {stack.ports.mqtt}")
    )
    token_file.write_text(OPERATOR_TOKEN + "\n")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return device, done


class MqttSession:
    """A paho MQTT 3.1.1 client on 127.0.0.1 that records what the broker answered: the CONNACK,
    the SUBACK, the messages it got, and whether the connection ended."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str,
        *,
        will_topic: str | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.connack: Any = None
        self.suback: list[Any] | None = None
        self.disconnected = threading.Event()
        self.messages: list[Any] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self.client.reconnect_delay_set(60, 60)  # never retry on its own during a test
        if username is not None:
            self.client.username_pw_set(username, password)
        if will_topic is not None:
            self.client.will_set(will_topic, "offline", qos=1)
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connack", rc)
        self.client.on_subscribe = lambda c, u, m, rcs, p: setattr(self, "suback", list(rcs))
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        poll(lambda: self.connack is not None, what="CONNACK")

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def publish(self, topic: str, payload: bytes) -> bool:
        """True when the broker acknowledged (PUBACK); False when it refused."""
        return publish_acked(self.client, topic, payload)

    def subscribe_granted(self, topic: str) -> bool:
        self.suback = None
        result, _ = self.client.subscribe(topic, qos=1)
        if result != 0:  # MQTT_ERR_SUCCESS
            return False
        poll(lambda: self.suback is not None or self.disconnected.is_set(), what="SUBACK")
        return self.suback is not None and not any(code.is_failure for code in self.suback)

    def drop(self) -> None:
        """The connection ends without DISCONNECT (the broker then publishes the Last Will)."""
        self.client.loop_stop()
        sock = self.client.socket()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
