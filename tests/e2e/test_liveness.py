"""Liveness operators can trust: online and offline on time, Last Will, status messages, one
sweeper among several workers, the event stream, link quality. Real broker, database and MQTT
clients; every wait is a poll with a deadline, and what is asserted is order and the
database's times: the measured delays go to the liveness report, printed at the end."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import threading
from datetime import UTC, datetime, timedelta

import httpx
import paho.mqtt.client as mqtt
import pytest
import redis
from broker4 import broker_stack_class
from sqlalchemy import Engine, make_url, text
from support import Device, mqtt_session, poll, publish_acked

from api.stream import CLIENT_QUEUE, OVERFLOW, StatusStream
from gateway.devtools.localstack import LocalStack
from gateway.storage import mirror

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FLEET = 20
FACTOR = 3.0  # GATEWAY_OFFLINE_FACTOR's default


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def events(api: httpx.Client, device_id: str) -> list[dict]:
    return api.get(f"/api/v1/devices/{device_id}/events").json()["items"]


def beat(stack: LocalStack, device: Device, **body) -> None:
    response = httpx.post(
        f"{stack.api_url}/api/v1/devices/{device.device_id}/heartbeats",
        json=body,
        headers=device.auth,
    )
    assert response.status_code == 202, response.text


class Stream:
    """An SSE client in a thread: every status event, with the time it arrived."""

    def __init__(self, stack: LocalStack, api: httpx.Client) -> None:
        self.events: list[tuple[dict, datetime]] = []
        self.content_type = ""
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._read,
            args=(f"{stack.api_url}/api/v1/events/stream", dict(api.headers)),
            daemon=True,
        )

    def __enter__(self) -> Stream:
        self._thread.start()
        assert self._ready.wait(10), "the event stream did not open"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _read(self, url: str, headers: dict) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, timeout=None) as response:
                self.content_type = response.headers["content-type"]
                for line in response.iter_lines():
                    if line.startswith(": connected"):
                        self._ready.set()
                    elif line.startswith("data: "):
                        self.events.append((json.loads(line[6:]), datetime.now(UTC)))
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            if not self._stop.is_set():  # the api went away while the test still listened
                raise

    def seen(self, device_ids: set[str], to_status: str) -> dict[str, tuple[dict, datetime]]:
        found = {e["device_id"]: (e, t) for e, t in self.events if e["to_status"] == to_status}
        return {d: found[d] for d in device_ids if d in found}


def record(name: str, delays: list[float]) -> dict:
    row = {
        "what": name,
        "devices": len(delays),
        "p50_s": round(statistics.median(delays), 3),
        "max_s": round(max(delays), 3),
    }
    report = broker_stack_class().test().run_dir / "liveness-report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(report.read_text()) if report.exists() else []
    report.write_text(json.dumps([r for r in rows if r["what"] != name] + [row], indent=2))
    return row


def test_silent_devices_go_offline_on_time(apps, api, register, engine: Engine) -> None:
    """Interval 1 s: offline once 3 s pass without a heartbeat, never before the deadline, and
    by the first sweep after it (the database's times: a sweep takes every device it finds
    expired, so no sweep of the fleet may fall between a device's deadline and its own). The
    delay as an operator sees it, the event's arrival on the stream after the deadline, goes
    to the liveness report."""
    fleet = [register("quiet", heartbeat_interval_s=1) for _ in range(FLEET)]
    ids = {d.device_id for d in fleet}
    with Stream(apps, api) as stream:
        for device in fleet:
            beat(apps, device, seq=1)
        arrived = poll(
            lambda: len(s := stream.seen(ids, "offline")) == FLEET and s,
            timeout=30,
            what=f"{FLEET} devices offline",
        )
    delays, deadlines = [], {}
    for device in fleet:
        event, when = arrived[device.device_id]
        assert event["reason"] == "timeout"
        view = api.get(f"/api/v1/devices/{device.device_id}").json()
        assert view["status"] == "offline"
        deadline = at(view["last_seen"]) + timedelta(seconds=1 * FACTOR)
        assert at(event["at"]) >= deadline, "marked offline before its deadline"
        deadlines[device.device_id] = deadline
        delays.append((when - deadline).total_seconds())
        history = events(api, device.device_id)
        assert [(e["from_status"], e["to_status"], e["reason"]) for e in reversed(history)] == [
            ("never_seen", "online", "heartbeat"),
            ("online", "offline", "timeout"),
        ]
    # Every sweep that marked anything, of this fleet or any other device, leaves its time.
    sweeps = {at(event["at"]) for event, _ in arrived.values()}
    with engine.connect() as conn:
        sweeps |= set(
            conn.execute(
                text(
                    "SELECT DISTINCT at FROM device_events WHERE reason = 'timeout'"
                    " AND at BETWEEN :first AND :last"
                ),
                {"first": min(deadlines.values()), "last": max(sweeps)},
            ).scalars()
        )
    for device_id, deadline in deadlines.items():
        swept = at(arrived[device_id][0]["at"])
        missed = [s for s in sweeps if deadline <= s < swept]
        assert not missed, f"{device_id} expired at {deadline}, left online by sweeps {missed}"
    record("timeout, interval 1 s (deadline to event on the stream)", delays)
    fleet_view = api.get("/api/v1/fleet", params={"recent": 100}).json()
    assert ids <= {d["device_id"] for d in fleet_view["recently_offline"]}


def connect(stack: LocalStack, device: Device) -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(device.device_id, device.token)
    client.will_set(f"devices/{device.device_id}/status", "offline", qos=1)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", stack.ports.mqtt, keepalive=30)
    client.loop_start()
    assert connected.wait(10)
    return client


def test_last_will_marks_a_vanished_device_offline_at_once(apps, api, register) -> None:
    """A device whose connection drops without DISCONNECT is offline by its Last Will, hours
    before its deadline: after its socket was killed, and with the reason `last_will`. The
    delay from the kill to the event on the stream goes to the liveness report."""
    fleet = [register("will", heartbeat_interval_s=3600) for _ in range(FLEET)]
    ids = {d.device_id for d in fleet}
    clients = [connect(apps, d) for d in fleet]
    with Stream(apps, api) as stream:
        for client, device in zip(clients, fleet, strict=True):
            info = client.publish(f"devices/{device.device_id}/heartbeat", b'{"seq": 1}', qos=1)
            info.wait_for_publish(timeout=10)
        poll(lambda: len(stream.seen(ids, "online")) == FLEET, what="all online")
        killed = {}
        for client, device in zip(clients, fleet, strict=True):
            client.loop_stop()  # no reconnect, no DISCONNECT: the connection just drops
            sock = client.socket()
            killed[device.device_id] = datetime.now(UTC)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        arrived = poll(
            lambda: len(s := stream.seen(ids, "offline")) == FLEET and s,
            timeout=15,
            what=f"{FLEET} Last Wills",
        )
    delays = []
    for device_id, (event, when) in arrived.items():
        assert event["reason"] == "last_will"
        assert at(event["at"]) >= killed[device_id], "offline before its connection dropped"
        view = api.get(f"/api/v1/devices/{device_id}").json()
        assert (view["status"], view["status_reason"]) == ("offline", "last_will")
        assert at(event["at"]) < at(view["last_seen"]) + timedelta(seconds=3600 * FACTOR)
        delays.append((when - killed[device_id]).total_seconds())
    record("Last Will, socket killed (kill to event on the stream)", delays)


def test_status_message_online_is_online_at_once(apps, api, device: Device) -> None:
    client = connect(apps, device)
    try:
        info = client.publish(f"devices/{device.device_id}/status", b"online", qos=1)
        info.wait_for_publish(timeout=10)
        view = poll(
            lambda: (
                (v := api.get(f"/api/v1/devices/{device.device_id}").json())["status"] == "online"
                and v
            ),
            what="online from its status message",
        )
        assert view["status_reason"] == "status_message"
        assert events(api, device.device_id)[0]["reason"] == "status_message"
    finally:
        client.disconnect()
        client.loop_stop()


def test_changing_the_interval_moves_the_deadline(apps, api, register) -> None:
    device = register("slow", heartbeat_interval_s=1)
    control = register("control", heartbeat_interval_s=1)  # keeps the old interval
    beat(apps, device)
    beat(apps, control)
    poll(
        lambda: api.get(f"/api/v1/devices/{device.device_id}").json()["status"] == "online",
        what="online",
    )
    changed = api.patch(f"/api/v1/devices/{device.device_id}", json={"heartbeat_interval_s": 600})
    assert changed.status_code == 200
    body = changed.json()
    assert body["heartbeat_interval_s"] == 600
    assert at(body["offline_deadline"]) - at(body["last_seen"]) == timedelta(seconds=1800)
    # Once the sweeper has taken the control device offline, the old deadline is past too.
    poll(
        lambda: (e := events(api, control.device_id)) and e[0]["reason"] == "timeout",
        timeout=15,
        what="the control device swept",
    )
    assert api.get(f"/api/v1/devices/{device.device_id}").json()["status"] == "online"
    assert all(e["reason"] != "timeout" for e in events(api, device.device_id))


def metric(stack: LocalStack, name: str, metric_name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.health_port(name)}/metrics").text
    for line in text.splitlines():
        if line.startswith(metric_name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_one_sweeper_among_several_workers(apps, api, register) -> None:
    apps.start_app("worker-2")
    apps.wait_apps(("worker-2",))
    try:

        def leaders() -> list[float] | None:
            flags = [metric(apps, n, "gateway_sweeper_leader") for n in ("worker", "worker-2")]
            return flags if sum(flags) == 1 else None

        flags = poll(leaders, what="exactly one sweeper")
        leader = ("worker", "worker-2")[flags.index(1.0)]
        os.kill(apps.component(leader).pid(), signal.SIGKILL)
        other = "worker-2" if leader == "worker" else "worker"
        poll(
            lambda: metric(apps, other, "gateway_sweeper_leader") == 1.0,
            timeout=15,
            what="the other worker takes over the sweep",
        )
        fleet = [register("swept", heartbeat_interval_s=1) for _ in range(5)]
        for device in fleet:
            beat(apps, device)
        for device in fleet:
            history = poll(
                lambda d=device: (
                    (e := events(api, d.device_id)) and e[0]["reason"] == "timeout" and e
                ),
                timeout=20,
                what="swept by the new sweeper",
            )
            assert [e["reason"] for e in history].count("timeout") == 1
    finally:
        apps.stop_app("worker-2")
        apps.up(echo=False)


def test_event_stream_reaches_several_clients(apps, api, register) -> None:
    device = register("streamed")
    with Stream(apps, api) as first, Stream(apps, api) as second:
        api.patch(f"/api/v1/devices/{device.device_id}", json={"heartbeat_interval_s": 1})
        beat(apps, device)

        def mine(stream: Stream) -> list[dict]:
            return [e for e, _ in stream.events if e["device_id"] == device.device_id]

        poll(
            lambda: all(len(mine(s)) >= 2 for s in (first, second)),
            timeout=20,
            what="online then offline on both",
        )
    for stream in (first, second):
        assert stream.content_type.startswith("text/event-stream")
        assert [(e["to_status"], e["reason"]) for e in mine(stream)[:2]] == [
            ("online", "heartbeat"),
            ("offline", "timeout"),
        ]


def test_link_quality_from_a_scripted_sequence(apps, api, device: Device) -> None:
    """Losses from the device's own `seq`; the arrival interval and the clock skew from the
    receive times the gateway stored, and the device's `ts` (2 s behind)."""
    skew = timedelta(seconds=2)
    sent = [s for s in range(10) if s not in (3, 7)]  # two heartbeats lost on the way
    device_ts = {}
    for seq in sent:
        device_ts[seq] = datetime.now(UTC) - skew
        beat(apps, device, seq=seq, ts=device_ts[seq].isoformat(), msg_id=f"lq-{seq}")
    quality = poll(
        lambda: (
            (q := api.get(f"/api/v1/devices/{device.device_id}").json()["link_quality"])
            and q["received"] == len(sent)
            and q
        ),
        what="all heartbeats counted",
    )
    stored = sorted(
        (at(h["received_at"]), h["seq"])
        for h in api.get(f"/api/v1/devices/{device.device_id}/heartbeats").json()["items"]
    )
    assert [seq for _, seq in stored] == sent  # received in the order sent
    arrivals = [received for received, _ in stored]
    intervals = [(b - a).total_seconds() for a, b in itertools.pairwise(arrivals)]
    skews = [(received - device_ts[seq]).total_seconds() for received, seq in stored]
    assert quality["expected"] == 10
    assert quality["loss_pct"] == 20.0
    assert quality["median_interval_s"] == round(statistics.median(intervals), 3)
    assert quality["clock_skew_s"] == round(statistics.median(skews), 3)
    assert all(s >= skew.total_seconds() for s in skews)  # received after it was sent
    assert quality["window_s"] == 3600


def test_redis_is_rebuilt_from_postgres_when_empty(apps, api, device: Device) -> None:
    beat(apps, device)
    client = redis.Redis.from_url(apps.redis_url)
    poll(lambda: mirror.read(client, device.device_id), what="mirrored")
    client.flushall()  # what a restarted Redis (nothing on disk) looks like
    apps.stop_app("worker")
    apps.start_app("worker")
    apps.wait_apps(("worker",))
    poll(lambda: client.exists(mirror.REBUILT_KEY), what="rebuilt at start")
    cached = mirror.read(client, device.device_id)
    assert cached is not None and cached.last_seen is not None
    client.close()


def test_events_page_newest_first(apps, api, device: Device) -> None:
    beat(apps, device)
    with mqtt_session(apps.ports.mqtt, device) as client:
        assert publish_acked(client, f"devices/{device.device_id}/status", b"offline")
    poll(lambda: len(events(api, device.device_id)) == 2, what="2 events")
    first = api.get(f"/api/v1/devices/{device.device_id}/events", params={"limit": 1}).json()
    assert [e["to_status"] for e in first["items"]] == ["offline"]
    second = api.get(
        f"/api/v1/devices/{device.device_id}/events",
        params={"limit": 1, "cursor": first["next_cursor"]},
    ).json()
    assert [e["to_status"] for e in second["items"]] == ["online"]
    assert second["next_cursor"] is None


def test_a_slow_stream_client_is_dropped_not_waited_for() -> None:
    """The fan-out never waits on a client: one 1,000 events behind is told and dropped."""

    async def scenario() -> None:
        stream = StatusStream(make_url("postgresql://unused/none"))
        slow = stream.subscribe()
        fast = stream.subscribe()
        for i in range(CLIENT_QUEUE + 5):
            stream._publish(f'{{"id": {i}}}')
            if not fast.empty():
                fast.get_nowait()  # this one keeps up
        items = [slow.get_nowait() for _ in range(slow.qsize())]
        assert items[-1] is OVERFLOW
        assert fast.empty() and fast in stream._clients and slow not in stream._clients

    asyncio.run(scenario())
