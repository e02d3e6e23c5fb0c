"""Fault injection on real processes: nothing acknowledged is lost, nothing is stored twice.

Each test drives a steady load of heartbeats with known msg_ids (MQTT QoS 1 devices and HTTP
devices), breaks something in the middle with a real signal, a real crash or a real stop, lets
the system recover, and then checks PostgreSQL: every heartbeat that got a PUBACK or a 202 is
stored exactly once, and nothing that was never sent is stored. Each fault also states, before
it runs, what it may cost (`Bounds`): how many heartbeats may go unacknowledged while it lasts
(none after), how long until both paths commit again, and which evidence shows the fault was
survived by redelivery or retry rather than dodged (the broker's redeliver counters, the
worker's retried writes). Each run adds a row to the fault report printed at the end of the
session (`.run/test/fault-report.json`; `make fault-report` copies it into
docs/results/faults.json and regenerates the table of docs/guarantees.md from it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import Engine, func, select
from support import Device, history, mqtt_session, poll, publish_acked, unique

from gateway.amqp import topology
from gateway.devtools.localstack import LocalStack, config_lines
from gateway.devtools.simulate import Credentials, Simulation
from gateway.storage import mirror, registry
from gateway.storage.schema import devices, heartbeats

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MQTT_DEVICES = 6
HTTP_DEVICES = 3
INTERVAL_S = 0.05  # per device: about 120 MQTT and 60 HTTP heartbeats per second in all
#: The outage of a fault runs from this long before it (a request in flight when it struck)
#: to this long after the test saw the stack ready again (a device's next try): heartbeats
#: sent outside it must all be acknowledged.
BEFORE_FAULT_S = 1.0
AFTER_RECOVERY_S = 1.0


@dataclass(frozen=True)
class Bounds:
    """What a fault may cost, stated before it runs; generous, for a noisy 2-core machine."""

    #: Of the heartbeats sent during the outage, the share that may stay unacknowledged.
    unacked_share: float
    #: The longest time after the fault with no commit on a path (MQTT or HTTP).
    recovery_s: float
    #: What must show that the fault was met, not dodged: `redelivery` (the broker redelivered
    #: messages of the inbox or the work queue, or the worker found heartbeats it had stored
    #: already: a device's retransmission, a batch committed but not acked) or `retry` (the
    #: worker retried writes the database refused while it was away).
    evidence: str | None = None


@dataclass(frozen=True)
class Counters:
    """The evidence counters at one moment: the broker's and the worker's (per process)."""

    broker_pid: int | None
    worker_pid: int | None
    redelivered: int
    absorbed: int
    retried: int

    @classmethod
    def read(cls, stack: LocalStack) -> Counters:
        worker = worker_metrics(stack)
        return cls(
            broker_pid=stack.component("rabbitmq").pid(),
            worker_pid=stack.component("worker").pid(),
            redelivered=broker_redeliveries(stack),
            absorbed=int(worker.get("gateway_heartbeats_duplicate_messages_total", 0)),
            retried=int(worker.get('gateway_worker_store_errors_total{kind="unavailable"}', 0)),
        )

    def since(self, before: Counters) -> Counters:
        """What was counted after `before`; a restarted broker or worker counts from zero."""
        same_broker = self.broker_pid == before.broker_pid
        same_worker = self.worker_pid == before.worker_pid
        return Counters(
            broker_pid=self.broker_pid,
            worker_pid=self.worker_pid,
            redelivered=self.redelivered - (before.redelivered if same_broker else 0),
            absorbed=self.absorbed - (before.absorbed if same_worker else 0),
            retried=self.retried - (before.retried if same_worker else 0),
        )


@dataclass
class Verdict:
    fault: str
    sent: int
    acked: int
    stored: int
    #: Heartbeats stored more than once (rows beyond the first).
    duplicates: int
    lost: int
    unexpected: int
    #: Messages the broker redelivered to consumers (the MQTT inbox and the work queue).
    redelivered: int
    #: Heartbeats the worker found stored already
    #: (its `gateway_heartbeats_duplicate_messages_total`).
    absorbed: int
    #: Writes the worker retried while the database was away.
    retried: int
    #: From the fault until the test saw the stack ready again.
    outage_s: float
    sent_in_outage: int
    unacked_in_outage: int
    #: Unacknowledged though sent outside the outage (before it, or after recovery).
    unacked_outside: int
    #: When the last unacknowledged heartbeat was sent, in seconds after recovery.
    last_unacked_s: float | None
    recovery_s: float
    bounds: Bounds
    #: A few lost heartbeats: (transport, msg_id, sent and acked seconds after the fault).
    lost_examples: list = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every way this run broke a promise or exceeded its bounds (empty: it held)."""
        found = []
        if self.acked == 0:
            found.append("nothing was acknowledged: the load never ran")
        if self.lost:
            found.append(
                f"{self.lost} acknowledged heartbeats were lost, e.g. {self.lost_examples}"
            )
        if self.duplicates:
            found.append(f"{self.duplicates} heartbeats stored twice")
        if self.unexpected:
            found.append(f"{self.unexpected} stored heartbeats were never sent")
        if self.unacked_outside:
            found.append(
                f"{self.unacked_outside} heartbeats sent outside the outage were never acknowledged"
            )
        share = self.unacked_in_outage / max(self.sent_in_outage, 1)
        if share > self.bounds.unacked_share:
            found.append(
                f"{self.unacked_in_outage} of {self.sent_in_outage} heartbeats sent during the "
                f"outage unacknowledged ({share:.0%} > {self.bounds.unacked_share:.0%})"
            )
        if self.recovery_s > self.bounds.recovery_s:
            found.append(f"recovery took {self.recovery_s} s > {self.bounds.recovery_s} s")
        if self.bounds.evidence == "redelivery" and self.redelivered + self.absorbed == 0:
            found.append(
                "neither a redelivery nor a duplicate was counted: the fault met nothing in flight"
            )
        if self.bounds.evidence == "retry" and self.retried == 0:
            found.append("the worker retried no write: it never saw the database go away")
        return found

    def row(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if k not in ("lost_examples", "bounds")}
        return {
            **row,
            "max_unacked_share": self.bounds.unacked_share,
            "max_recovery_s": self.bounds.recovery_s,
            "evidence": self.bounds.evidence,
            "ok": not self.problems(),
        }


class Load:
    """MQTT and HTTP devices sending in the background, with an exact tally."""

    def __init__(self, stack: LocalStack, engine: Engine, name: str, bounds: Bounds) -> None:
        self.stack, self.engine, self.name, self.bounds = stack, engine, name, bounds
        creds = self._register(MQTT_DEVICES + HTTP_DEVICES)
        self.device_ids = [c.device_id for c in creds]
        common = {"interval_s": INTERVAL_S, "mqtt_port": stack.ports.mqtt, "api_url": stack.api_url}
        self.mqtt = Simulation(creds[:MQTT_DEVICES], transport="mqtt", **common)
        self.http = Simulation(creds[MQTT_DEVICES:], transport="http", seed=1, **common)
        self.fault_at: float | None = None
        self.recovered_at: float | None = None
        self._before: Counters | None = None

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
        """The fault strikes now (the evidence counters are read first)."""
        self._before = Counters.read(self.stack)
        self.fault_at = time.time()

    def recovered(self) -> None:
        """The test saw the stack ready again: the outage ends."""
        self.recovered_at = time.time()

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.mqtt.settle()
            time.sleep(0.1)

    def finish(self, *, drain_timeout: float = 60) -> Verdict:
        """Stop sending, collect acknowledgements, wait for the pipeline to drain, check."""
        assert self.fault_at is not None and self._before is not None, "fault() was not called"
        assert self.recovered_at is not None, "recovered() was not called"
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
        fault_at = self.fault_at
        recovery = 0.0
        for tally in (mqtt_tally, http_tally):
            commits = sorted(rows[m][1] for m in tally.sent if m in rows and rows[m][1] > fault_at)
            gaps = [b - a for a, b in zip([fault_at, *commits], commits, strict=False)]
            recovery = max(recovery, *gaps) if gaps else recovery
        outage_from, outage_to = fault_at - BEFORE_FAULT_S, self.recovered_at + AFTER_RECOVERY_S
        in_outage = {m for m, at in sent.items() if outage_from <= at <= outage_to}
        unacked = sent.keys() - acked.keys()
        counted = self._evidence()
        verdict = Verdict(
            fault=self.name,
            sent=len(sent),
            acked=len(acked),
            stored=sum(count for count, _ in rows.values()),
            duplicates=sum(count - 1 for count, _ in rows.values() if count > 1),
            lost=len(acked.keys() - rows.keys()),
            unexpected=len(rows.keys() - sent.keys()),
            redelivered=counted.redelivered,
            absorbed=counted.absorbed,
            retried=counted.retried,
            outage_s=round(self.recovered_at - fault_at, 2),
            sent_in_outage=len(in_outage),
            unacked_in_outage=len(unacked & in_outage),
            unacked_outside=len(unacked - in_outage),
            last_unacked_s=(
                round(max(sent[m] for m in unacked) - self.recovered_at, 2) if unacked else None
            ),
            recovery_s=round(recovery, 2),
            bounds=self.bounds,
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

    def _evidence(self) -> Counters:
        assert self._before is not None
        return Counters.read(self.stack).since(self._before)


def record(verdict: Verdict) -> None:
    """Add (or replace) this fault's row in the run's report."""
    path = LocalStack.test().run_dir / "fault-report.json"
    report = json.loads(path.read_text()) if path.exists() else {"faults": []}
    rows = [r for r in report["faults"] if r["fault"] != verdict.fault] + [verdict.row()]
    report = {"run": run_facts(), "faults": rows}
    path.write_text(json.dumps(report, indent=2) + "\n")


def run_facts() -> dict:
    """Where the figures come from: when, which commit, how many cores."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "commit": commit,
        "cpus": os.cpu_count(),
        "load_per_s": round((MQTT_DEVICES + HTTP_DEVICES) / INTERVAL_S),
    }


def assert_survived(verdict: Verdict) -> None:
    problems = verdict.problems()
    assert not problems, f"{verdict.fault}: " + "; ".join(problems)


@pytest.fixture
def healthy(apps: LocalStack) -> Iterator[LocalStack]:
    """The whole stack up and ready before and after each fault."""
    ensure_up(apps)
    restore_disk_free_limit(apps)  # a run killed during the disk alarm test left it raised
    yield apps
    ensure_up(apps)


def ensure_up(stack: LocalStack) -> None:
    """Start what a fault left stopped. Services that answer /readyz 200 reach the broker,
    the database and Redis, so a stack whose processes all run and are ready is left alone."""
    parts = ("rabbitmq", "postgres", "redis", "worker", "bridge", "api")
    if not (all(stack.component(name).pid() for name in parts) and apps_ready(stack)):
        stack.up(apps=True, echo=False)


def kill9(stack: LocalStack, name: str) -> None:
    """`kill -9` of a component of the stack, by its pid."""
    pid = stack.component(name).pid()
    assert pid, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    poll(lambda: stack.component(name).pid() is None, what=f"{name} gone")


@contextlib.contextmanager
def frozen(stack: LocalStack, name: str, load: Load, seconds: float = 0.5) -> Iterator[None]:
    """Component `name` stopped (SIGSTOP) while the load goes on for `seconds`, then for the
    block: it holds the deliveries the broker sent it meanwhile, unacked, whatever moment of
    its work the fault would otherwise have met. Resumed (SIGCONT) after the block."""
    pid = stack.component(name).pid()
    assert pid, f"{name} is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        load.run(seconds)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed in the block
            os.kill(pid, signal.SIGCONT)


def restart_app(stack: LocalStack, name: str) -> None:
    stack.start_app(name)
    stack.wait_apps((name,))


def apps_ready(stack: LocalStack, names: tuple[str, ...] = ("worker", "bridge", "api")) -> bool:
    return all(stack.app_ready(name) for name in names)


#: Faults off the acknowledgement path (the broker answers devices; the api needs neither the
#: bridge, the worker nor Redis) leave nothing unacknowledged but a slow answer on a busy
#: machine (the api gives up waiting for the broker's confirm after 5 s).
OFF_THE_ACK_PATH = 0.05

APP_KILLS = {
    "worker": Bounds(unacked_share=OFF_THE_ACK_PATH, recovery_s=30, evidence="redelivery"),
    "bridge": Bounds(unacked_share=OFF_THE_ACK_PATH, recovery_s=30, evidence="redelivery"),
    # HTTP devices get errors while the api is down (their share of the load: a third).
    "api": Bounds(unacked_share=0.6, recovery_s=30),
}


@pytest.mark.parametrize("name", list(APP_KILLS))
def test_kill_9_and_restart(healthy: LocalStack, engine: Engine, name: str) -> None:
    """The worker and the bridge die holding deliveries (frozen a moment first), the api with
    requests in flight; each is started again."""
    with Load(healthy, engine, f"kill -9 {name}", APP_KILLS[name]) as load:
        load.run(1)
        load.fault()
        if name == "api":
            kill9(healthy, name)
        else:
            with frozen(healthy, name, load):
                kill9(healthy, name)
        load.run(1)
        restart_app(healthy, name)
        load.recovered()
        load.run(3)
        verdict = load.finish()
    assert_survived(verdict)


def restart_rabbitmq(healthy: LocalStack, load: Load, apps: dict[str, int | None]) -> None:
    """Start the broker again; bridge, worker and api reconnect by themselves (the same
    processes become ready)."""
    load.run(1)
    healthy.start_rabbitmq()
    healthy.wait_infrastructure()
    poll(lambda: apps_ready(healthy), timeout=60, what="bridge, worker and api reconnected")
    assert {name: healthy.component(name).pid() for name in apps} == apps
    load.recovered()
    load.run(3)


#: While the broker is away HTTP devices get 503s (a third of the load); MQTT devices keep
#: their QoS 1 publishes and are acknowledged once it is back. The broker goes down while the
#: bridge holds deliveries (frozen a moment first): it must redeliver them.
BROKER_DOWN = Bounds(unacked_share=0.6, recovery_s=90, evidence="redelivery")


def test_rabbitmq_restart(healthy: LocalStack, engine: Engine) -> None:
    apps = {name: healthy.component(name).pid() for name in ("worker", "bridge", "api")}
    with Load(healthy, engine, "RabbitMQ stop + start", BROKER_DOWN) as load:
        load.run(1)
        load.fault()
        with frozen(healthy, "bridge", load):
            healthy.stop_rabbitmq()
        restart_rabbitmq(healthy, load, apps)
        verdict = load.finish(drain_timeout=90)
    assert_survived(verdict)


def test_rabbitmq_kill_9(healthy: LocalStack, engine: Engine) -> None:
    """The broker's node (its Erlang VM, the pid in the stack's pid file) dies under load;
    messages it had not written to disk were never confirmed, so never acknowledged."""
    apps = {name: healthy.component(name).pid() for name in ("worker", "bridge", "api")}
    with Load(healthy, engine, "kill -9 RabbitMQ, start", BROKER_DOWN) as load:
        load.run(1)
        load.fault()
        with frozen(healthy, "bridge", load):
            kill9(healthy, "rabbitmq")
        restart_rabbitmq(healthy, load, apps)
        verdict = load.finish(drain_timeout=90)
    assert_survived(verdict)


#: While PostgreSQL is away HTTP devices get 503s (their tokens cannot be checked); MQTT goes
#: on into the queue. The worker keeps its batch and retries it.
DATABASE_DOWN = Bounds(unacked_share=0.6, recovery_s=60, evidence="retry")
DATABASE_OUTAGE_S = 8


def test_postgres_crash_immediate(healthy: LocalStack, engine: Engine) -> None:
    """`pg_ctl stop -m immediate`: every PostgreSQL process quits at once, no checkpoint; the
    next start replays the WAL. Meanwhile the work queue grows, the worker stays up and says
    it is not ready."""
    worker_pid = healthy.component("worker").pid()
    name = f"PostgreSQL crash (immediate stop), {DATABASE_OUTAGE_S} s"
    with Load(healthy, engine, name, DATABASE_DOWN) as load:
        load.run(1)
        load.fault()
        depth_before = queue_depth(healthy)
        healthy.stop_postgres(mode="immediate")
        outage_ends = time.monotonic() + DATABASE_OUTAGE_S
        for port in (healthy.ports.api, healthy.ports.worker_health):
            poll(lambda port=port: ready_status(port) == 503, what=f"/readyz 503 on {port}")
        poll(lambda: queue_depth(healthy) > depth_before + 100, what="the work queue to grow")
        load.run(max(0.0, outage_ends - time.monotonic()))
        assert healthy.component("worker").pid() == worker_pid, "the worker died"
        healthy.start_postgres()
        poll(lambda: apps_ready(healthy), timeout=30, what="worker and api ready again")
        load.recovered()
        load.run(3)
        verdict = load.finish(drain_timeout=120)
    assert healthy.component("worker").pid() == worker_pid
    assert_survived(verdict)


def test_postgres_kill_9(healthy: LocalStack, engine: Engine) -> None:
    """`kill -9` of the postmaster: its backends notice and quit by themselves (they are
    waited for, never signalled), then PostgreSQL starts again and recovers from its WAL."""
    worker_pid = healthy.component("worker").pid()
    with Load(healthy, engine, "kill -9 PostgreSQL, start", DATABASE_DOWN) as load:
        load.run(1)
        load.fault()
        postmaster = healthy.component("postgres").pid()
        assert postmaster, "PostgreSQL is not running"
        backends = children(postmaster)
        os.kill(postmaster, signal.SIGKILL)
        poll(
            lambda: not any(alive(pid) for pid in (postmaster, *backends)),
            timeout=30,
            what="PostgreSQL's processes to quit after their postmaster died",
        )
        load.run(2)
        healthy.start_postgres()
        poll(lambda: apps_ready(healthy), timeout=30, what="worker and api ready again")
        load.recovered()
        load.run(3)
        verdict = load.finish(drain_timeout=120)
    assert healthy.component("worker").pid() == worker_pid
    assert_survived(verdict)


def test_disk_alarm_blocks_publishers(healthy: LocalStack, engine: Engine) -> None:
    """RabbitMQ's free-disk alarm, raised on the stack's own node by setting its free-space
    limit above the free space (nothing is written): every publisher is blocked, so nothing
    new is acknowledged (MQTT publishes wait unanswered, the api answers 503 after its confirm
    timeout); once the limit is put back, ingest resumes and what waited is acknowledged."""
    bounds = Bounds(unacked_share=0.6, recovery_s=40)
    with Load(healthy, engine, "disk alarm on the broker", bounds) as load:
        load.run(1)
        load.fault()
        free = shutil.disk_usage(healthy.run_dir / "rabbitmq").free
        healthy.rabbitmqctl("set_disk_free_limit", str(free + 2**40))
        try:
            poll(lambda: disk_alarm(healthy), what="the disk alarm")
            load.run(0.5)  # what the broker took before it blocked them is acknowledged by now
            acked = len(load.mqtt.tally.acked), len(load.http.tally.acked)
            load.run(2)
            assert (len(load.mqtt.tally.acked), len(load.http.tally.acked)) == acked, (
                "heartbeats were acknowledged while the broker blocked publishers"
            )
            poll(lambda: mqtt_blocked(healthy, load), what="the devices' connections blocked")
        finally:
            healthy.rabbitmqctl("set_disk_free_limit", configured_disk_free_limit(healthy))
        poll(lambda: not disk_alarm(healthy), what="the alarm to clear")
        load.recovered()
        load.run(3)
        verdict = load.finish()
    assert_survived(verdict)


def test_redis_down(healthy: LocalStack, engine: Engine, api, redis_client: redis.Redis) -> None:
    bounds = Bounds(unacked_share=OFF_THE_ACK_PATH, recovery_s=15)
    with Load(healthy, engine, "Redis down 6 s", bounds) as load:
        load.run(1)
        load.fault()
        healthy.stop_redis()
        load.run(1)
        device = load.device_ids[0]
        stored = lambda: history(api, device)  # noqa: E731
        first = stored()[0]["received_at"]
        poll(lambda: stored()[0]["received_at"] > first, what="persistence going on")
        view = api.get(f"/api/v1/devices/{device}")
        assert view.status_code == 200, "the API must answer from PostgreSQL"
        assert view.json()["last_seen"] >= first
        load.run(2)
        healthy.start_redis()
        poll(healthy.redis_ready, what="Redis back")
        load.recovered()
        load.run(3)
        verdict = load.finish()
    assert_survived(verdict)
    with engine.connect() as conn:
        truth = {
            row["device_id"]: row
            for row in conn.execute(
                select(devices).where(devices.c.device_id.in_(load.device_ids))
            ).mappings()
        }

    def mirrored() -> bool:
        for device_id, row in truth.items():
            cached = mirror.read(redis_client, device_id)
            if cached is None or cached.version < row["version"]:
                return False
        return True

    poll(mirrored, timeout=30, what="Redis to mirror PostgreSQL again")


def test_sigterm_each_service_under_load(healthy: LocalStack, engine: Engine) -> None:
    # HTTP devices get errors while the api restarts.
    bounds = Bounds(unacked_share=0.6, recovery_s=30)
    with Load(healthy, engine, "SIGTERM bridge, worker, api", bounds) as load:
        load.run(1)
        load.fault()
        for name in ("worker", "bridge", "api"):
            os.kill(healthy.component(name).pid(), signal.SIGTERM)
            # Its open work finished (GATEWAY_SHUTDOWN_TIMEOUT_S), it exits by itself, with 0;
            # the wait is only a deadline for a service that would not stop at all.
            code = healthy.wait_exit(name, timeout=60)
            assert code == 0, f"{name} exited with {code} after SIGTERM (None: still running)"
            restart_app(healthy, name)
            if name != "api":
                load.run(1)
        load.recovered()
        load.run(3)
        verdict = load.finish()
    assert_survived(verdict)


def test_two_workers_two_bridges(healthy: LocalStack, engine: Engine) -> None:
    extra = ("worker-2", "bridge-2")
    for name in extra:
        healthy.start_app(name)
    healthy.wait_apps(extra)
    try:
        before = {name: persisted(healthy, name) for name in ("worker", "worker-2")}
        bounds = Bounds(unacked_share=OFF_THE_ACK_PATH, recovery_s=15)
        with Load(healthy, engine, "2 workers + 2 bridges", bounds) as load:
            load.fault()
            load.recovered()
            load.run(3)
            verdict = load.finish()
        shares = {name: persisted(healthy, name) - before[name] for name in before}
    finally:
        for name in extra:
            healthy.stop_app(name)
    assert_survived(verdict)
    assert all(share > 0 for share in shares.values()), f"work not shared: {shares}"


def queue_depth(stack: LocalStack) -> int:
    """Messages the broker holds on the work queue: ready, and delivered to the worker but not
    acked (the management API's figure, refreshed every few seconds)."""
    queue = stack.management("GET", f"/api/queues/%2F/{topology.WORK_QUEUE}")
    return queue.get("messages", 0)


def broker_redeliveries(stack: LocalStack) -> int:
    """Messages the broker redelivered to consumers since it started, from its Prometheus
    endpoint (a live counter, unlike the management API's statistics, which lag by up to 5 s):
    all the gateway's queues are classic ones."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.prometheus}/metrics", timeout=10).text
    return int(sum(value for key, value in samples(text).items() if key.startswith(REDELIVERED)))


REDELIVERED = 'rabbitmq_global_messages_redelivered_total{protocol="amqp091",'


def mqtt_blocked(stack: LocalStack, load: Load) -> bool:
    """Every MQTT connection of the load's devices is blocked by the broker (as the management
    API last saw it)."""
    mine = {c.device_id for c in load.mqtt.devices}
    states = [
        c.get("state") for c in stack.management("GET", "/api/connections") if c.get("user") in mine
    ]
    return len(states) == len(mine) and all(s in ("blocked", "blocking") for s in states)


def disk_alarm(stack: LocalStack) -> bool:
    """Is the broker's free-disk alarm on? (From its Prometheus endpoint: live.)"""
    text = httpx.get(f"http://127.0.0.1:{stack.ports.prometheus}/metrics", timeout=10).text
    return samples(text)["rabbitmq_alarms_free_disk_space_watermark"] == 1


def restore_disk_free_limit(stack: LocalStack) -> None:
    """Put back the broker's configured free-disk limit while its disk alarm is on (a run
    killed during the disk alarm test would leave it raised)."""
    if disk_alarm(stack):
        stack.rabbitmqctl("set_disk_free_limit", configured_disk_free_limit(stack))


def configured_disk_free_limit(stack: LocalStack) -> str:
    return config_lines(stack.rabbitmq_config())["disk_free_limit.absolute"]


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state_field = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state_field != "Z"


def ready_status(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=8).status_code
    except httpx.HTTPError:
        return 0


def worker_metrics(stack: LocalStack, name: str = "worker") -> dict[str, float]:
    """The worker's Prometheus samples by name and labels (empty while it is not answering)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{stack.health_port(name)}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    return samples(text)


def samples(text: str) -> dict[str, float]:
    """Prometheus text: each sample's value by its name and labels."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def persisted(stack: LocalStack, name: str) -> float:
    return worker_metrics(stack, name).get("gateway_heartbeats_persisted_messages_total", 0.0)
