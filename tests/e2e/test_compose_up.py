"""docker-compose.yaml built and started for real, then driven from 127.0.0.1 only.

A private dockerd (tests/dockerd.py) builds every image from Debian's packages on a base made
with debootstrap (no image registry), `docker-compose up` waits for every healthcheck, and the
tests talk to the published ports as a device and an operator would: RabbitMQ 4.x's MQTT with
the api as its auth backend (logins, topic rights), Last Will, dead letters, HTTP ingest, REST
reads; then the stateless services scaled and killed under load, a stop and start, and the
production profile's refusals. The steps' timings (cold: a first build; warm: images reused)
are printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from compose_stack import COMPOSE_FILE, PRODUCTION_FILE, ComposeError, ComposeStack
from dockerd import Dockerd, DockerdError, install_packages
from support import Device, MqttSession, poll, unavailable, unique

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(2400)]

REPORT = Path(__file__).resolve().parents[2] / ".run" / "compose-report.json"


class _Report:
    """Prints what the run measured after the test summary (a plugin registered at run time)."""

    def __init__(self) -> None:
        self.lines: dict[str, str] = {}

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.lines:
            terminalreporter.section("docker compose (tests/e2e/test_compose_up.py)")
            for key, value in self.lines.items():
                terminalreporter.write_line(f"{key:<44} {value}")


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Iterator[_Report]:
    plugin = _Report()
    request.config.pluginmanager.register(plugin, "compose-report")
    yield plugin
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(plugin.lines, indent=2) + "\n")


@pytest.fixture(scope="module")
def compose(report: _Report) -> Iterator[ComposeStack]:
    """The stack of docker-compose.yaml, built and healthy; removed (volumes too) afterwards.
    The images stay in the engine's data-root for the next run."""
    if shutil.which("mosquitto_pub") is None:
        unavailable("mosquitto_pub is missing (make test installs it)")
    engine = Dockerd()
    try:
        install_packages()
        engine.start()
    except DockerdError as exc:
        unavailable(f"no Docker engine: {exc}")
    stack = ComposeStack.for_tests(engine)
    try:
        stack.down()  # what an interrupted run may have left
        stack.build()
        stack.timings["up until healthy"] = stack.up()
        for what, seconds in stack.timings.items():
            report.lines[what] = f"{seconds:.1f} s"
        yield stack
    except (ComposeError, DockerdError) as exc:
        pytest.fail(str(exc))
    finally:
        stack.down()
        engine.stop()


@pytest.fixture(scope="module")
def operator(compose: ComposeStack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=compose.api_url,
        headers={"Authorization": f"Bearer {compose.operator_token}"},
        timeout=10,
    ) as client:
        yield client


def register(operator: httpx.Client, prefix: str = "cmp", **fields) -> Device:
    device_id = unique(prefix)
    response = operator.post("/api/v1/devices", json={"device_id": device_id, **fields})
    assert response.status_code == 201, response.text
    return Device(device_id, response.json()["token"])


def history(operator: httpx.Client, device_id: str) -> list[dict]:
    response = operator.get(f"/api/v1/devices/{device_id}/heartbeats", params={"limit": 500})
    return response.json()["items"] if response.status_code == 200 else []


def state(operator: httpx.Client, device_id: str) -> dict:
    response = operator.get(f"/api/v1/devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()


def mosquitto_pub(
    compose: ComposeStack, device: Device, kind: str, message: str, *, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The README's command line against the compose broker, QoS 1."""
    return subprocess.run(
        [
            "mosquitto_pub",
            *("-h", "127.0.0.1", "-p", str(compose.mqtt_port), "-q", "1"),
            *("-i", device.device_id, "-u", device.device_id),
            *("-P", device.token if password is None else password),
            *("-t", f"devices/{device.device_id}/{kind}", "-m", message),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Session(MqttSession):
    """A device's MQTT session with compose's broker."""

    def __init__(
        self, compose: ComposeStack, device: Device, *, password: str | None = None, will=False
    ) -> None:
        super().__init__(
            compose.mqtt_port,
            device.device_id,
            password or device.token,
            device.device_id,
            will_topic=f"devices/{device.device_id}/status" if will else None,
        )


def stored_by_msg_id(compose: ComposeStack, device_ids: list[str]) -> dict[str, int]:
    """msg_id -> rows in PostgreSQL, for the given devices (read in the database itself)."""
    listed = ",".join(f"'{d}'" for d in device_ids)  # ids made by unique(): [a-z0-9-] only
    rows = compose.psql(
        f"SELECT msg_id, count(*) FROM heartbeats WHERE device_id IN ({listed}) GROUP BY msg_id"
    )
    return {msg_id: int(count) for msg_id, count in rows}


# ---- the stack as built ---------------------------------------------------------------------


def test_every_service_is_healthy_on_rabbitmq_4(
    compose: ComposeStack, operator: httpx.Client, report: _Report
) -> None:
    states = compose.health()
    assert all(w == "healthy" for s in ("rabbitmq", "postgres", "redis") for w in states[s])
    assert states["migrate"] == ["exited 0"], "the one-shot migration must have run"
    admin = compose.secrets["GATEWAY_BROKER_ADMIN_PASSWORD"]
    overview = httpx.get(
        f"{compose.management_url}/api/overview", auth=("gateway", admin), timeout=10
    ).json()
    assert overview["rabbitmq_version"].startswith("4."), overview["rabbitmq_version"]
    protocols = {listener["protocol"] for listener in overview["listeners"]}
    assert {"amqp", "mqtt", "mqtt/ssl", "https/web-mqtt"} <= protocols, protocols
    (postgres,) = compose.psql("SHOW server_version")[0]
    redis = compose.compose(
        "exec", "-T", "redis", "redis-server", "--version", timeout=30
    ).stdout.split()
    report.lines["RabbitMQ / Erlang"] = (
        f"{overview['rabbitmq_version']} / {overview['erlang_version']}"
    )
    report.lines["PostgreSQL / Redis"] = f"{postgres} / {redis[2].removeprefix('v=')}"
    assert operator.get("/readyz").status_code == 200
    assert httpx.get(f"{compose.api_url}/api/v1/devices", timeout=10).status_code == 401


def test_heartbeats_over_mqtt_and_http_are_read_back_over_rest(
    compose: ComposeStack, operator: httpx.Client
) -> None:
    device = register(operator)
    assert state(operator, device.device_id)["status"] == "never_seen"
    sent = mosquitto_pub(compose, device, "heartbeat", '{"seq": 1, "msg_id": "m1", "cpu": 12.5}')
    assert sent.returncode == 0, sent.stderr
    response = httpx.post(
        f"{compose.api_url}/api/v1/devices/{device.device_id}/heartbeats",
        json={"seq": 2, "msg_id": "h2", "temp_c": 48.2},
        headers=device.auth,
        timeout=10,
    )
    assert response.status_code == 202, response.text
    stored = poll(
        lambda: len(rows := history(operator, device.device_id)) == 2 and rows,
        timeout=30,
        what="both heartbeats stored",
    )
    assert sorted((h["msg_id"], h["source"], h["metrics"]) for h in stored) == [
        ("h2", "http", {"temp_c": 48.2}),
        ("m1", "mqtt", {"cpu": 12.5}),
    ]
    assert state(operator, device.device_id)["status"] == "online"


# ---- broker-facing: the auth backend, topic rights, Last Will, dead letters on RabbitMQ 4 ---


def test_logins_are_decided_by_the_api(compose: ComposeStack, operator: httpx.Client) -> None:
    device, other = register(operator), register(operator)
    refused = mosquitto_pub(compose, device, "heartbeat", "{}", password="gwd_wrong")
    assert refused.returncode != 0, "a wrong token was accepted"
    for password in ("gwd_wrong", other.token):
        session = Session(compose, device, password=password)
        assert not session.accepted, "CONNACK accepted a token that is not the device's"
        session.close()
    assert (
        operator.patch(f"/api/v1/devices/{other.device_id}", json={"enabled": False}).json()[
            "enabled"
        ]
        is False
    )
    disabled = Session(compose, other)
    assert not disabled.accepted, "a disabled device logged in"
    disabled.close()
    session = Session(compose, device)
    try:
        assert session.accepted
        assert session.publish(f"devices/{device.device_id}/heartbeat", b'{"msg_id": "ok"}')
    finally:
        session.close()
    poll(lambda: history(operator, device.device_id), what="the accepted heartbeat")
    assert [h["msg_id"] for h in history(operator, device.device_id)] == ["ok"]
    assert history(operator, other.device_id) == []


def test_a_device_publishes_and_reads_only_its_own_topics(
    compose: ComposeStack, operator: httpx.Client
) -> None:
    a, b = register(operator, "a"), register(operator, "b")
    session = Session(compose, a)
    try:
        assert session.accepted
        assert not session.publish(f"devices/{b.device_id}/heartbeat", b'{"msg_id": "forged"}')
    finally:
        session.close()
    for topic in (f"devices/{b.device_id}/commands", "devices/#", "#"):
        session = Session(compose, a)
        try:
            assert not session.subscribe_granted(topic), f"{a.device_id} may read {topic}"
        finally:
            session.close()
    session = Session(compose, a)
    try:
        assert session.subscribe_granted(f"devices/{a.device_id}/commands")
    finally:
        session.close()
    # b's own marker, once stored: anything forged before it would be stored too.
    assert mosquitto_pub(compose, b, "heartbeat", '{"msg_id": "marker"}').returncode == 0
    poll(lambda: history(operator, b.device_id), what="b's marker")
    assert [h["msg_id"] for h in history(operator, b.device_id)] == ["marker"]


def test_last_will_marks_a_vanished_device_offline(
    compose: ComposeStack, operator: httpx.Client
) -> None:
    device = register(operator, "will", heartbeat_interval_s=3600)
    session = Session(compose, device, will=True)
    assert session.publish(f"devices/{device.device_id}/heartbeat", b'{"seq": 1}')
    poll(lambda: state(operator, device.device_id)["status"] == "online", what="online")
    session.drop()
    offline = poll(
        lambda: (s := state(operator, device.device_id))["status"] == "offline" and s,
        timeout=30,
        what="offline by the Last Will",
    )
    assert offline["status_reason"] == "last_will"


def test_bad_payloads_become_dead_letters_and_the_flow_goes_on(
    compose: ComposeStack, operator: httpx.Client
) -> None:
    device = register(operator)
    for body in ('{"cpu": NaN}', "{not json", '{"seq": -3}'):
        assert mosquitto_pub(compose, device, "heartbeat", body).returncode == 0
    assert mosquitto_pub(compose, device, "heartbeat", '{"msg_id": "good"}').returncode == 0

    def dead() -> list[dict]:
        response = operator.get("/api/v1/rejected", params={"device_id": device.device_id})
        return response.json()["items"]

    letters = poll(lambda: len(d := dead()) == 3 and d, timeout=30, what="3 dead letters")
    assert sorted(d["payload"] for d in letters) == sorted(
        ['{"cpu": NaN}', "{not json", '{"seq": -3}']
    )
    assert all(d["source"] == "mqtt" and d["reason"] for d in letters)
    assert "non_finite_number" in {d["reason"] for d in letters}
    poll(lambda: history(operator, device.device_id), what="the good heartbeat")
    assert [h["msg_id"] for h in history(operator, device.device_id)] == ["good"]


# ---- scaled, killed, stopped and started ---------------------------------------------------

LOAD_DEVICES = 8
LOAD_SECONDS = 18.0
LOAD_RATE_PER_DEVICE = 10.0  # heartbeats per second
KILL_AFTER_S = 6.0


def mqtt_load(compose: ComposeStack, device: Device, stop: threading.Event, acked: set[str]):
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(device.device_id, device.token)
    client.connect("127.0.0.1", compose.mqtt_port, keepalive=30)
    client.loop_start()
    sent: list[tuple[str, mqtt.MQTTMessageInfo]] = []
    try:
        seq = 0
        while not stop.is_set() and seq < LOAD_SECONDS * LOAD_RATE_PER_DEVICE:
            seq += 1
            msg_id = f"{device.device_id}-{seq}"
            body = json.dumps({"seq": seq, "msg_id": msg_id, "cpu": seq % 100})
            sent.append((msg_id, client.publish(f"devices/{device.device_id}/heartbeat", body, 1)))
            stop.wait(1 / LOAD_RATE_PER_DEVICE)
        for _, info in sent:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=15)
        acked.update(msg_id for msg_id, info in sent if info.is_published())
    finally:
        client.disconnect()
        client.loop_stop()


def http_load(compose: ComposeStack, device: Device, stop: threading.Event, acked: set[str]):
    deadline = time.monotonic() + LOAD_SECONDS
    with httpx.Client(base_url=compose.api_url, headers=device.auth, timeout=10) as client:
        seq = 0
        while not stop.is_set() and time.monotonic() < deadline:
            seq += 1
            msg_id = f"{device.device_id}-{seq}"
            with contextlib.suppress(httpx.HTTPError):
                response = client.post(
                    f"/api/v1/devices/{device.device_id}/heartbeats",
                    json={"seq": seq, "msg_id": msg_id},
                )
                if response.status_code == 202:
                    acked.add(msg_id)
            stop.wait(0.05)


def test_scaled_out_and_killed_mid_load_every_acknowledged_heartbeat_is_stored_once(
    compose: ComposeStack, operator: httpx.Client, report: _Report
) -> None:
    compose.up("--scale", "worker=3", "--scale", "bridge=2")
    workers, bridges = compose.containers("worker"), compose.containers("bridge")
    assert (len(workers), len(bridges)) == (3, 2)
    mqtt_devices = [register(operator, "load") for _ in range(LOAD_DEVICES)]
    http_device = register(operator, "load")
    acked: set[str] = set()
    stop = threading.Event()
    threads = [
        threading.Thread(target=mqtt_load, args=(compose, d, stop, acked), name=d.device_id)
        for d in mqtt_devices
    ] + [threading.Thread(target=http_load, args=(compose, http_device, stop, acked))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        time.sleep(KILL_AFTER_S)  # load running: the kill lands mid-stream
        killed = [workers[0], bridges[0]]
        subprocess.run(
            ["docker", "kill", *killed],
            env=compose.dockerd.env(),
            capture_output=True,
            check=True,
            timeout=30,
        )
        killed_at = time.monotonic() - started
    finally:
        for thread in threads:
            thread.join(LOAD_SECONDS + 60)
        stop.set()
    elapsed = time.monotonic() - started
    assert len(acked) > LOAD_DEVICES * LOAD_RATE_PER_DEVICE * KILL_AFTER_S / 2, "load too thin"
    ids = [d.device_id for d in (*mqtt_devices, http_device)]
    stored = poll(
        lambda: (s := stored_by_msg_id(compose, ids)) and acked <= s.keys() and s,
        timeout=180,
        what="every acknowledged heartbeat stored",
    )
    duplicates = {msg_id: n for msg_id, n in stored.items() if n != 1}
    assert not duplicates, f"stored more than once: {duplicates}"
    report.lines["scaled run: acknowledged / stored once"] = (
        f"{len(acked)} / {sum(1 for m in acked if stored.get(m) == 1)} "
        f"({elapsed:.0f} s, a worker and a bridge killed at {killed_at:.0f} s)"
    )
    # The next `up` (without --scale) brings each service back to one container.


def test_stop_then_up_keeps_the_state_in_the_volumes(
    compose: ComposeStack, operator: httpx.Client, report: _Report
) -> None:
    device = register(operator, "keep")
    session = Session(compose, device)
    try:
        for seq in range(1, 21):
            body = json.dumps({"seq": seq, "msg_id": f"before-{seq}"}).encode()
            assert session.publish(f"devices/{device.device_id}/heartbeat", body)
    finally:
        session.close()
    before = poll(
        lambda: len(rows := history(operator, device.device_id)) == 20 and rows,
        timeout=60,
        what="20 heartbeats stored",
    )
    # Acknowledged while the worker is stopped: they wait on the broker's durable queue.
    compose.compose("stop", "worker", timeout=120)
    session = Session(compose, device)
    try:
        for seq in range(21, 31):
            body = json.dumps({"seq": seq, "msg_id": f"queued-{seq}"}).encode()
            assert session.publish(f"devices/{device.device_id}/heartbeat", body)
    finally:
        session.close()
    started = time.monotonic()
    compose.compose("stop", timeout=300)
    assert compose.containers("rabbitmq") == [] or all(
        not compose.inspect(c)["State"]["Running"] for c in compose.containers("rabbitmq")
    )
    compose.up()
    report.lines["stop, then up until healthy"] = f"{time.monotonic() - started:.1f} s"
    with httpx.Client(
        base_url=compose.api_url,
        headers={"Authorization": f"Bearer {compose.operator_token}"},
        timeout=10,
    ) as fresh:
        after = poll(
            lambda: len(rows := history(fresh, device.device_id)) == 30 and rows,
            timeout=60,
            what="the 10 queued heartbeats stored after the restart",
        )
        assert {h["msg_id"] for h in before} <= {h["msg_id"] for h in after}
        # The registry survived: the same token still logs in.
        assert mosquitto_pub(compose, device, "heartbeat", '{"msg_id": "after"}').returncode == 0
        poll(lambda: len(history(fresh, device.device_id)) == 31, what="the heartbeat after")


def test_the_production_profile_refuses_to_start_without_its_secrets(
    compose: ComposeStack,
) -> None:
    files = (COMPOSE_FILE, PRODUCTION_FILE)
    unsafe = compose.compose(
        "up",
        "-d",
        "--no-deps",
        "api",
        files=files,
        check=False,
        env=compose.env(GATEWAY_OPERATOR_TOKEN=None),
    )
    assert unsafe.returncode != 0
    assert "GATEWAY_OPERATOR_TOKEN" in unsafe.stderr and "make compose-env" in unsafe.stderr
    # Given but weak: the services themselves refuse to start in production.
    for service, weak, words in (
        ("api", {"GATEWAY_OPERATOR_TOKEN": "changeme"}, "GATEWAY_OPERATOR_TOKEN is unsafe"),
        ("bridge", {"GATEWAY_BROKER_BRIDGE_PASSWORD": "guest"}, "unsafe secrets"),
    ):
        run = compose.compose(
            "run",
            "--rm",
            "-T",
            "--no-deps",
            "--name",
            f"{compose.project}-refused-{uuid.uuid4().hex[:6]}",
            service,
            files=files,
            check=False,
            timeout=120,
            env=compose.env(**weak),
        )
        assert run.returncode != 0, f"{service} started with {weak}"
        assert words in run.stdout + run.stderr, (run.stdout + run.stderr)[-2000:]
