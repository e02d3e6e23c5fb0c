"""A hostile neighbour, end to end through the real stack (RabbitMQ's MQTT plugin, bridge,
worker, api, PostgreSQL): while device A sends a stream of hostile payloads over MQTT (paho,
QoS 1) and HTTP, and hostile topics, device B sends ordinary heartbeats with known msg_ids.

- every heartbeat B had acknowledged is stored exactly once, and B is served during A's
  stream, not after it: its first heartbeat is stored before A's last message is received
  (the database's times; how long B's heartbeats took is printed, not asserted);
- every message of A that the broker acknowledged (or the api answered) ends as the
  conversion says: a dead letter with its reason, or, for the few valid bodies in the stream
  (the issue's `{"big": 1e308}`), a stored heartbeat; nothing else of A is stored;
- no 5xx, no process restarted (same pids, still ready), and the MQTT inbox holds no message
  at the end, acked or not.

A publish the broker refuses (an ACL denial closes the connection on RabbitMQ 3.10) is "not
acknowledged": the sender reconnects and goes on. A's stream stays far below the per-device cap
on dead letters (a few hundred messages), and everything runs on loopback.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import paho.mqtt.client as mqtt
import pytest
from hostile import ISSUE_BODIES, RawMqtt, corpus, corpus_bytes, hostile_stream
from sqlalchemy import Engine, text
from support import Device, poll

from gateway.contract.conversion import Forward, Reject, convert
from gateway.contract.messages import MAX_REJECTED_BYTES
from gateway.contract.payload import MAX_PAYLOAD_BYTES
from gateway.contract.reasons import storable_text
from gateway.contract.topics import claimed_device, mqtt_topic
from gateway.devtools.localstack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MQTT_BODIES = 180
HTTP_BODIES = 60
B_MQTT = 120
B_HTTP = 40
APPS = ("bridge", "worker", "api")


@dataclass
class Sent:
    """What one sender sent: (where, body, acknowledged)."""

    items: list[tuple[str, bytes, bool]] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    last_at: float = 0.0

    def add(self, where: str, body: bytes, acked: bool) -> None:
        self.items.append((where, body, acked))
        self.last_at = time.monotonic()


class MqttSender:
    """A device's paho client (QoS 1) that treats a refused publish or a closed connection as
    not acknowledged, and reconnects for the next one."""

    def __init__(self, port: int, device: Device) -> None:
        self.port = port
        self.device = device
        self.client: mqtt.Client | None = None
        self.reconnects = 0

    def publish(self, topic: str, body: bytes) -> bool:
        client = self.client or self._connect()
        if client is None:
            return False
        try:
            info = client.publish(topic, body, qos=1)
            info.wait_for_publish(timeout=5)
        except (RuntimeError, ValueError):
            pass
        else:
            if info.is_published():
                return True
        self.close()  # the broker may have closed it: a fresh one for the next publish
        return False

    def _connect(self) -> mqtt.Client | None:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.device.device_id,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.username_pw_set(self.device.device_id, self.device.token)
        try:
            client.connect("127.0.0.1", self.port, keepalive=30)
        except OSError:
            return None
        client.loop_start()
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not client.is_connected():
            client.loop_stop()
            return None
        self.client = client
        self.reconnects += 1
        return client

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


def expected_outcome(topic: str, body: bytes) -> str:
    """What the bridge's conversion makes of it: `stored`, or the dead letter's reason."""
    outcome = convert(mqtt_topic(topic), body)
    if isinstance(outcome, Forward):
        return "stored"
    assert isinstance(outcome, Reject), outcome
    return outcome.rejection.reason.value


def hostile_topics(a: str, b: str) -> list[tuple[bytes, bytes]]:
    """(topic, body) pairs: topics that do not parse, are not A's, are not UTF-8, hold NUL or
    wildcards; and status messages that are not one. Bodies are unique (to find them)."""
    probes = [
        f"devices/{a}/telemetry".encode(),
        f"devices/{a}/".encode(),
        f"devices/{a}".encode(),
        f"devices/{a}/heartbeat/extra".encode(),
        f"devices/{a}/hé".encode(),
        f"devices/{a}/heart\x00beat".encode(),
        f"devices/{b}/heartbeat".encode(),
        f"devices/{a}/#".encode(),
        b"devices/+/heartbeat",
        b"/devices/" + a.encode() + b"/heartbeat",
        b"$SYS/broker",
        b"",
        *(corpus_bytes(e, "topic").replace(b"{device}", a.encode()) for e in corpus("topics")),
    ]
    pairs = [(topic, f'{{"probe": "{uuid.uuid4()}"}}'.encode()) for topic in probes]
    status = f"devices/{a}/status".encode()
    return [*pairs, (status, b"maybe"), (status, b"\xff\xfe"), (status, b"online" * 100)]


def test_a_hostile_device_cannot_hurt_its_neighbour(
    apps: LocalStack, api: httpx.Client, register, engine: Engine
) -> None:
    a, b = register("hostile"), register("neighbour")
    pids = {name: apps.component(name).pid() for name in APPS}
    assert all(pids.values()), pids
    heartbeat_a = f"devices/{a.device_id}/heartbeat"
    stream = hostile_stream(random.Random(13), MQTT_BODIES + HTTP_BODIES)
    # The generated part holds only what is refused; the issue's and the corpus' are kept as
    # they are (some of them are valid heartbeats, and must be stored).
    kept = {*ISSUE_BODIES, *(corpus_bytes(e) for e in corpus("payloads"))}
    stream = [x for x in stream if x in kept or expected_outcome(heartbeat_a, x) != "stored"]
    over_mqtt, over_http = stream[: len(stream) * 3 // 4], stream[len(stream) * 3 // 4 :]
    over_http += sorted(kept)
    probes = hostile_topics(a.device_id, b.device_id)
    a_mqtt, a_http, b_mqtt, b_http = Sent(), Sent(), Sent(), Sent()
    start = threading.Barrier(4)

    def send_a_mqtt() -> None:
        """A's bodies on its heartbeat topic (paho), and now and then a hostile topic (a raw
        client, on the same client id: one connection of A's at a time)."""
        sender = MqttSender(apps.ports.mqtt, a)
        start.wait()
        for i, body in enumerate(over_mqtt):
            a_mqtt.add(heartbeat_a, body, sender.publish(heartbeat_a, body))
            if i % 8 == 0 and probes:
                topic, probe = probes.pop()
                sender.close()
                raw = RawMqtt(apps.ports.mqtt, a.device_id, a.token)
                acked = raw.connected and raw.publish(topic, probe)
                raw.close()
                a_mqtt.add(topic.decode("utf-8", "surrogateescape"), probe, acked)
        sender.close()

    def send_http(device: Device, bodies: list[bytes], sent: Sent) -> None:
        path = f"/api/v1/devices/{device.device_id}/heartbeats"
        with httpx.Client(base_url=apps.api_url, headers=device.auth, timeout=10) as client:
            start.wait()
            for body in bodies:
                response = client.post(
                    path, content=body, headers={"Content-Type": "application/json"}
                )
                sent.statuses[response.status_code] += 1
                sent.add(path, body, response.status_code < 500)

    def send_b_mqtt() -> None:
        sender = MqttSender(apps.ports.mqtt, b)
        topic = f"devices/{b.device_id}/heartbeat"
        start.wait()
        for i in range(B_MQTT):
            body = json.dumps({"msg_id": f"b-mqtt-{i}", "seq": i, "cpu": 12.5}).encode()
            b_mqtt.add(topic, body, sender.publish(topic, body))
            time.sleep(0.01)  # an ordinary device's pace, not a flood
        sender.close()

    b_bodies = [json.dumps({"msg_id": f"b-http-{i}", "seq": i}).encode() for i in range(B_HTTP)]
    with ThreadPoolExecutor(4) as pool:
        jobs = [
            pool.submit(send_a_mqtt),
            pool.submit(send_http, a, over_http, a_http),
            pool.submit(send_b_mqtt),
            pool.submit(send_http, b, b_bodies, b_http),
        ]
        for job in jobs:
            job.result()
    assert not probes, "the stream was too short to carry every hostile topic"

    # B: every heartbeat acknowledged, each stored exactly once, and stored while A's stream
    # was still arriving.
    assert all(acked for _, _, acked in b_mqtt.items), "the broker refused B's heartbeats"
    assert b_http.statuses == Counter({202: B_HTTP}), b_http.statuses
    expected_b = {f"b-mqtt-{i}" for i in range(B_MQTT)} | {f"b-http-{i}" for i in range(B_HTTP)}
    last_sent = max(b_mqtt.last_at, b_http.last_at)
    stored = poll(
        lambda: (s := stored_msg_ids(engine, b.device_id)).keys() >= expected_b and s,
        timeout=60,
        what="every heartbeat of B stored",
    )
    assert set(stored) == expected_b and set(stored.values()) == {1}

    # A: no 5xx; each acknowledged message is what the conversion says (a dead letter with its
    # reason, or stored when valid), and nothing else of A is stored. (A message the broker
    # took but whose acknowledgement was lost may end so too: counts lie between what was
    # acknowledged and what was sent.)
    assert not [s for s in a_http.statuses if s >= 500], a_http.statuses
    sent_a = [item for sent in (a_mqtt, a_http) for item in sent.items]
    acked = sum(ok for _, _, ok in sent_a)
    assert acked > len(over_mqtt) // 2, "too few of A's messages got through to test"
    dead: dict[bool, Counter] = {True: Counter(), False: Counter()}  # by acknowledged
    stored_a, filed_under_a = Counter(), Counter()
    for where, body, ok in sent_a:
        via_http = where.startswith("/api/")
        reason = expected_outcome(heartbeat_a if via_http else where, body)
        if reason == "stored":
            stored_a[ok] += 1
            continue
        dead[ok][
            ("http" if via_http else "mqtt", storable_text(where), kept_of(body, via_http), reason)
        ] += 1
        filed_under_a[ok] += via_http or claimed_device(mqtt_topic(where)) == a.device_id
    may_be_dead = dead[True] + dead[False]
    reasons = {key[:3]: key[3] for key in may_be_dead}

    def all_dead_letters() -> Counter:
        found = dead_letters_with(
            engine, [kept_of(body, where.startswith("/api/")) for where, body, _ in sent_a]
        )
        return found if all(found[k] >= n for k, n in dead[True].items()) else Counter()

    found = poll(all_dead_letters, timeout=30, what=f"{dead[True].total()} dead letters")
    b_first_stored, a_last_received = served_during(engine, b.device_id, a.device_id)
    assert b_first_stored < a_last_received, "B was served only once A's stream was over"
    for key, count in found.items():
        if key[:3] in reasons:  # one of A's (the same bytes may come from other tests)
            assert key[3] == reasons[key[:3]], key
            assert count <= may_be_dead[key], key
    listed = rejected_count(api, a.device_id)
    assert filed_under_a[True] <= listed <= filed_under_a.total()
    stored = stored_msg_ids(engine, a.device_id).total()
    assert stored_a[True] <= stored <= stored_a.total()

    # Nothing restarted, nothing stuck.
    assert {name: apps.component(name).pid() for name in APPS} == pids
    assert all(apps.app_ready(name) for name in APPS)
    poll(lambda: inbox_drained(apps), timeout=30, what="the MQTT inbox empty, nothing unacked")
    topics = [ok for w, _, ok in a_mqtt.items if w != heartbeat_a]
    print(
        f"A: {acked} of {len(sent_a)} acknowledged ({sum(topics)} of {len(topics)} hostile "
        f"topics), {dead[True].total()} dead letters, {stored} stored, HTTP "
        f"{dict(a_http.statuses)}; B: "
        f"{len(expected_b)} stored, the last {latest_stored_after(engine, b.device_id, last_sent)}"
    )


def stored_msg_ids(engine: Engine, device_id: str) -> Counter:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT msg_id FROM heartbeats WHERE device_id = :d"), {"d": device_id}
        ).scalars()
        return Counter(rows)


def served_during(engine: Engine, b: str, a: str) -> tuple:
    """When B's first heartbeat was stored, and when the gateway received A's last message
    (a dead letter, or one of the few valid bodies stored)."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT (SELECT min(stored_at) FROM heartbeats WHERE device_id = :b),"
                " greatest((SELECT max(received_at) FROM rejected WHERE device_id = :a),"
                " (SELECT max(received_at) FROM heartbeats WHERE device_id = :a))"
            ),
            {"a": a, "b": b},
        ).one()


def kept_of(body: bytes, via_http: bool) -> bytes:
    """What a dead letter keeps of `body`: its first 64 KiB; over HTTP nothing of a body the
    request declares too large (it is refused before it is read)."""
    if via_http and len(body) > MAX_PAYLOAD_BYTES:
        return b""
    return body[:MAX_REJECTED_BYTES]


def dead_letters_with(engine: Engine, payloads: list[bytes]) -> Counter:
    """Recent dead letters with one of these payloads, by (source, topic, payload, reason)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT source, topic, payload, reason FROM rejected"
                " WHERE payload = ANY(:payloads) AND received_at > now() - interval '10 minutes'"
            ),
            {"payloads": list(set(payloads))},
        ).all()
    return Counter((r.source, r.topic, bytes(r.payload), r.reason) for r in rows)


def rejected_count(api: httpx.Client, device_id: str) -> int:
    """How many dead letters the api lists for the device (every page)."""
    count, cursor = 0, None
    while True:
        params = {"device_id": device_id, "limit": 500, **({"cursor": cursor} if cursor else {})}
        response = api.get("/api/v1/rejected", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        count += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return count


def latest_stored_after(engine: Engine, device_id: str, sent_at: float) -> str:
    """How long after `sent_at` (monotonic) the device's last heartbeat was stored."""
    with engine.connect() as conn:
        stored_at = conn.execute(
            text("SELECT max(stored_at) FROM heartbeats WHERE device_id = :d"), {"d": device_id}
        ).scalar_one()
    elapsed = stored_at.timestamp() - (time.time() - (time.monotonic() - sent_at))
    return f"{elapsed:.2f} s after it was sent"


def inbox_drained(stack: LocalStack) -> bool:
    queue = stack.management("GET", "/api/queues/%2F/gateway.mqtt.inbox")
    return queue.get("messages") == 0 and queue.get("messages_unacknowledged") == 0


OUT_OF_RANGE = [b'{"ts":"0001-01-01T00:00:00+01:00"}', b'{"ts":"9999-12-31T23:59:59-01:00"}']


def test_the_issue_timestamps_over_mqtt_cost_one_dead_letter_each(
    apps: LocalStack, register, engine: Engine
) -> None:
    """The issue's first row: such a heartbeat stopped MQTT ingest for every device."""
    device, other = register(), register()
    a, b = MqttSender(apps.ports.mqtt, device), MqttSender(apps.ports.mqtt, other)
    topic = f"devices/{device.device_id}/heartbeat"
    try:
        for body in OUT_OF_RANGE:
            assert a.publish(topic, body)
        assert b.publish(f"devices/{other.device_id}/heartbeat", b'{"msg_id": "after"}')
    finally:
        a.close()
        b.close()
    poll(lambda: stored_msg_ids(engine, other.device_id) == Counter({"after": 1}), what="B")

    def dead_letters() -> Counter:
        found = dead_letters_with(engine, OUT_OF_RANGE)
        return Counter({k: n for k, n in found.items() if k[1] == topic})

    dead = poll(lambda: sum((d := dead_letters()).values()) == 2 and d, what="2 dead letters")
    assert {(k[2], k[3]) for k in dead} == {(body, "invalid_field") for body in OUT_OF_RANGE}
    assert not stored_msg_ids(engine, device.device_id)


@pytest.mark.parametrize("body", OUT_OF_RANGE)
def test_the_issue_timestamps_over_http_are_a_422_naming_ts(
    apps: LocalStack, api: httpx.Client, register, body: bytes
) -> None:
    """The issue's second row: a 500 and no dead letter."""
    device = register()
    response = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats",
        content=body,
        headers={**device.auth, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("ts: ts ")
    assert "1970-01-01T00:00:00Z to 9999-12-30T00:00:00Z" in response.json()["detail"]
    dead = poll(
        lambda: api.get("/api/v1/rejected", params={"device_id": device.device_id}).json()["items"],
        what="the dead letter",
    )
    assert [(d["reason"], d["payload"]) for d in dead] == [("invalid_field", body.decode())]
