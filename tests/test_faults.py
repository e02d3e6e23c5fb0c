"""Fault injection on real processes: nothing acknowledged is lost, nothing is stored twice.

Each test drives a steady load of heartbeats with known msg_ids (MQTT QoS 1 devices and HTTP
devices), breaks something in the middle with a real signal or a real stop, lets the system
recover, and then checks PostgreSQL: every heartbeat that got a PUBACK or a 202 is stored exactly
once, and nothing that was never sent is stored. Each run adds a row to the fault report
printed at the end of the session (`.run/test/fault-report.json`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis
from sqlalchemy import Engine, func, select
from support import Device, history, mqtt_session, poll, publish_acked, unique

from gateway import registry, state
from gateway.localstack import LocalStack
from gateway.schema import devices, heartbeats
from gateway.simulate import Credentials, Simulation

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MQTT_DEVICES = 6
HTTP_DEVICES = 3
INTERVAL_S = 0.05  # per device: about 120 MQTT and 60 HTTP heartbeats per second in all


@dataclass
class Verdict:
    fault: str
    sent: int
    acked: int
    stored: int
    duplicates: int
    lost: int
    unexpected: int
    recovery_s: float
    #: A few lost heartbeats: (transport, msg_id, sent and acked seconds after the fault).
    lost_examples: list = field(default_factory=list)

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "lost_examples"}


class Load:
    """MQTT and HTTP devices sending in the background, with an exact tally."""

    def __init__(self, stack: LocalStack, engine: Engine, name: str) -> None:
        self.stack, self.engine, self.name = stack, engine, name
        creds = self._register(MQTT_DEVICES + HTTP_DEVICES)
        self.device_ids = [c.device_id for c in creds]
        common = {"interval_s": INTERVAL_S, "mqtt_port": stack.ports.mqtt, "api_url": stack.api_url}
        self.mqtt = Simulation(creds[:MQTT_DEVICES], transport="mqtt", **common)
        self.http = Simulation(creds[MQTT_DEVICES:], transport="http", seed=1, **common)
        self.fault_at: float | None = None

    def _register(self, count: int) -> list[Credentials]:
        with self.engine.begin() as conn:
            return [
                Credentials(issued.device_id, issued.token)
                for issued, _ in (
                    registry.register(conn, registry.Registration(device_id=unique("flt")))
                    for _ in range(count)
                )
            ]

    def __enter__(self) -> Load:
        self.mqtt.start()
        self.http.start()
        poll(self._flowing, timeout=30, what="the load to flow")
        return self

    def _flowing(self) -> bool:
        self.mqtt.settle()
        return len(self.mqtt.tally.acked) > 20 and len(self.http.tally.acked) > 10

    def __exit__(self, *exc: object) -> None:
        self.mqtt.stop(settle_s=0)
        self.http.stop(settle_s=0)

    def _send_markers(self) -> set[str]:
        """One heartbeat down each path, after the load (not part of the verdict)."""
        mqtt_device, http_device = self.mqtt.devices[0], self.http.devices[0]
        mqtt_marker, http_marker = f"marker-mqtt-{unique()}", f"marker-http-{unique()}"
        device = Device(mqtt_device.device_id, mqtt_device.token)
        with mqtt_session(self.stack.ports.mqtt, device) as client:
            body = json.dumps({"msg_id": mqtt_marker}).encode()
            assert publish_acked(client, f"devices/{device.device_id}/heartbeat", body)
        response = httpx.post(
            f"{self.stack.api_url}/api/v1/devices/{http_device.device_id}/heartbeats",
            json={"msg_id": http_marker},
            headers={"Authorization": f"Bearer {http_device.token}"},
        )
        assert response.status_code == 202, response.text
        return {mqtt_marker, http_marker}

    def fault(self) -> None:
        self.fault_at = time.time()

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.mqtt.settle()
            time.sleep(0.1)

    def finish(self, *, drain_timeout: float = 60) -> Verdict:
        """Stop sending, collect acknowledgements, wait for the pipeline to drain, check."""
        mqtt_tally = self.mqtt.stop(settle_s=20)
        http_tally = self.http.stop()
        sent = {**mqtt_tally.sent, **http_tally.sent}
        acked = {**mqtt_tally.acked, **http_tally.acked}

        def stored_rows() -> dict[str, tuple[int, float]]:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(heartbeats.c.msg_id, func.count(), func.min(heartbeats.c.stored_at))
                    .where(heartbeats.c.device_id.in_(self.device_ids))
                    .group_by(heartbeats.c.msg_id)
                ).all()
            return {msg_id: (count, at.timestamp()) for msg_id, count, at in rows}

        deadline = time.monotonic() + drain_timeout
        while not acked.keys() <= stored_rows().keys() and time.monotonic() < deadline:
            time.sleep(0.5)
        # One last heartbeat down each path: once both are stored, what was queued before them
        # has been through too, and a late duplicate would show now.
        markers = self._send_markers()
        poll(lambda: markers <= stored_rows().keys(), timeout=60, what="the markers")
        rows = {m: v for m, v in stored_rows().items() if m not in markers}
        # Recovery: the longest time after the fault during which no heartbeat of a path
        # (MQTT or HTTP) was committed, on the slower path.
        fault_at = self.fault_at or 0.0
        recovery = 0.0
        for tally in (mqtt_tally, http_tally):
            commits = sorted(rows[m][1] for m in tally.sent if m in rows and rows[m][1] > fault_at)
            gaps = [b - a for a, b in zip([fault_at, *commits], commits, strict=False)]
            recovery = max(recovery, *gaps) if gaps else recovery
        verdict = Verdict(
            fault=self.name,
            sent=len(sent),
            acked=len(acked),
            stored=sum(count for count, _ in rows.values()),
            duplicates=sum(count - 1 for count, _ in rows.values() if count > 1),
            lost=len(acked.keys() - rows.keys()),
            unexpected=len(rows.keys() - sent.keys()),
            recovery_s=round(recovery, 2),
            lost_examples=[
                (
                    "mqtt" if m in mqtt_tally.acked else "http",
                    m,
                    round(sent[m] - fault_at, 2),
                    round(acked[m] - fault_at, 2),
                )
                for m in sorted(acked.keys() - rows.keys(), key=acked.get)[:5]
            ],
        )
        record(verdict)
        return verdict


def record(verdict: Verdict) -> None:
    report = LocalStack.test().run_dir / "fault-report.json"
    rows = json.loads(report.read_text()) if report.exists() else []
    rows = [r for r in rows if r["fault"] != verdict.fault] + [verdict.row()]
    report.write_text(json.dumps(rows, indent=2))


def assert_exactly_once(verdict: Verdict) -> None:
    assert verdict.acked > 0, "nothing was acknowledged: the load never ran"
    assert verdict.lost == 0, (
        f"{verdict.lost} acknowledged heartbeats were lost, e.g. {verdict.lost_examples}"
    )
    assert verdict.duplicates == 0, f"{verdict.duplicates} heartbeats stored twice"
    assert verdict.unexpected == 0, f"{verdict.unexpected} stored heartbeats were never sent"


@pytest.fixture
def healthy(apps: LocalStack) -> Iterator[LocalStack]:
    """The whole stack up and ready before and after each fault."""
    apps.up(apps=True, echo=False)
    yield apps
    apps.up(apps=True, echo=False)


def kill9(stack: LocalStack, name: str) -> None:
    pid = stack.component(name).pid()
    assert pid, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    poll(lambda: stack.component(name).pid() is None, what=f"{name} gone")


def restart_app(stack: LocalStack, name: str) -> None:
    stack.start_app(name)
    stack.wait_apps((name,))


@pytest.mark.parametrize("name", ["worker", "bridge", "api"])
def test_kill_9_and_restart(healthy: LocalStack, engine: Engine, name: str) -> None:
    with Load(healthy, engine, f"kill -9 {name}") as load:
        load.run(2)
        load.fault()
        kill9(healthy, name)
        load.run(1)
        restart_app(healthy, name)
        load.run(3)
        verdict = load.finish()
    assert_exactly_once(verdict)


def test_rabbitmq_restart(healthy: LocalStack, engine: Engine) -> None:
    before = {name: healthy.component(name).pid() for name in ("worker", "bridge", "api")}
    with Load(healthy, engine, "RabbitMQ stop + start") as load:
        load.run(2)
        load.fault()
        healthy.stop_rabbitmq()
        load.run(2)
        healthy.start_rabbitmq()
        healthy.wait_infrastructure()
        # bridge, worker and api reconnect by themselves: the same processes become ready.
        poll(lambda: all(healthy.app_ready(n) for n in before), timeout=60, what="reconnected")
        load.run(5)
        verdict = load.finish(drain_timeout=90)
    assert {name: healthy.component(name).pid() for name in before} == before
    assert_exactly_once(verdict)
    assert verdict.acked > verdict.sent * 0.5, "devices did not go on after the restart"


def test_postgres_down_for_20_s(healthy: LocalStack, engine: Engine) -> None:
    worker_pid = healthy.component("worker").pid()
    with Load(healthy, engine, "PostgreSQL down 20 s") as load:
        load.run(2)
        load.fault()
        depth_before = queue_depth(healthy)
        healthy.stop_postgres()
        outage_ends = time.monotonic() + 20
        for port in (healthy.ports.api, healthy.ports.worker_health):
            poll(lambda port=port: ready_status(port) == 503, what=f"/readyz 503 on {port}")
        load.run(max(0.0, outage_ends - time.monotonic() - 1))
        assert queue_depth(healthy) > depth_before + 100, "the work queue did not grow"
        assert healthy.component("worker").pid() == worker_pid, "the worker died"
        healthy.start_postgres()
        poll(lambda: ready_status(healthy.ports.worker_health) == 200, what="worker ready again")
        load.run(3)
        verdict = load.finish(drain_timeout=120)
    assert healthy.component("worker").pid() == worker_pid
    assert_exactly_once(verdict)


def test_redis_down(healthy: LocalStack, engine: Engine, api, redis_client: redis.Redis) -> None:
    with Load(healthy, engine, "Redis down 10 s") as load:
        load.run(2)
        load.fault()
        healthy.stop_redis()
        load.run(2)
        device = load.device_ids[0]
        stored = lambda: history(api, device)  # noqa: E731
        first = stored()[0]["received_at"]
        poll(lambda: stored()[0]["received_at"] > first, what="persistence going on")
        view = api.get(f"/api/v1/devices/{device}")
        assert view.status_code == 200, "the API must answer from PostgreSQL"
        assert view.json()["last_seen"] >= first
        load.run(6)
        healthy.start_redis()
        poll(healthy.redis_ready, what="Redis back")
        load.run(4)
        verdict = load.finish()
    assert_exactly_once(verdict)
    with engine.connect() as conn:
        truth = {
            row["device_id"]: row
            for row in conn.execute(
                select(devices).where(devices.c.device_id.in_(load.device_ids))
            ).mappings()
        }

    def mirrored() -> bool:
        for device_id, row in truth.items():
            cached = state.read(redis_client, device_id)
            if cached is None or cached.version < row["version"]:
                return False
        return True

    poll(mirrored, timeout=30, what="Redis to mirror PostgreSQL again")


def test_sigterm_each_service_under_load(healthy: LocalStack, engine: Engine) -> None:
    with Load(healthy, engine, "SIGTERM bridge, worker, api") as load:
        load.run(2)
        load.fault()
        for name in ("worker", "bridge", "api"):
            pid = healthy.component(name).pid()
            started = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            code = healthy.wait_exit(name, timeout=10)
            took = time.monotonic() - started
            assert code == 0, f"{name} exited with {code} after SIGTERM"
            assert took < 10, f"{name} took {took:.1f} s to stop"
            restart_app(healthy, name)
            load.run(2)
        verdict = load.finish()
    assert_exactly_once(verdict)


def test_two_workers_two_bridges(healthy: LocalStack, engine: Engine) -> None:
    extra = ("worker-2", "bridge-2")
    for name in extra:
        healthy.start_app(name)
    healthy.wait_apps(extra)
    try:
        before = {name: persisted(healthy, name) for name in ("worker", "worker-2")}
        with Load(healthy, engine, "2 workers + 2 bridges") as load:
            load.run(5)
            load.fault()
            verdict = load.finish()
        shares = {name: persisted(healthy, name) - before[name] for name in before}
    finally:
        for name in extra:
            healthy.stop_app(name)
    assert_exactly_once(verdict)
    assert all(share > 0 for share in shares.values()), f"work not shared: {shares}"


def queue_depth(stack: LocalStack) -> int:
    """Messages the broker holds on the work queue: ready, and delivered to the worker but not
    acked (the management API's figure, refreshed every few seconds)."""
    queue = stack.management("GET", "/api/queues/%2F/gateway.heartbeats")
    return queue.get("messages", 0)


def ready_status(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=8).status_code
    except httpx.HTTPError:
        return 0


def persisted(stack: LocalStack, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.health_port(name)}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_heartbeats_persisted_total ")
    )
