"""End to end through the real local stack: RabbitMQ's MQTT plugin, bridge, worker, api,
PostgreSQL and Redis, driven by real MQTT clients (paho-mqtt and mosquitto_pub) and HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from support import poll, unavailable, unique

from gateway.localstack import LocalStack

pytestmark = [pytest.mark.e2e]

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


def device_state(api: httpx.Client, device: str) -> dict | None:
    response = api.get(f"/api/v1/devices/{device}")
    return response.json() if response.status_code == 200 else None


def history(api: httpx.Client, device: str) -> list[dict]:
    response = api.get(f"/api/v1/devices/{device}/heartbeats")
    return response.json()["items"] if response.status_code == 200 else []


def paho_publish(stack: LocalStack, topic: str, payload: bytes, qos: int = 1) -> None:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=unique("paho"), protocol=mqtt.MQTTv311
    )
    client.connect("127.0.0.1", stack.ports.mqtt, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), "no PUBACK from the broker"
    finally:
        client.disconnect()
        client.loop_stop()


def mosquitto_pub(stack: LocalStack, topic: str, message: str) -> None:
    if shutil.which("mosquitto_pub") is None:
        unavailable("mosquitto_pub is missing (apt-get install mosquitto-clients)")
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(stack.ports.mqtt), "-q", "1"]
    subprocess.run(
        [*command, "-t", topic, "-m", message],
        check=True,
        timeout=20,
    )


def test_paho_qos1_heartbeat_is_visible_through_the_api(apps: LocalStack, api) -> None:
    device = unique("paho")
    paho_publish(apps, f"devices/{device}/heartbeat", b'{"seq": 1, "cpu": 12.5, "msg_id": "p1"}')
    state = poll(lambda: device_state(api, device), what=f"{device} in the API")
    assert state["status"] == "online"
    assert state["metrics"] == {"cpu": 12.5}
    assert state["latest_heartbeat"]["seq"] == 1
    assert state["last_seen"] is not None
    stored = poll(lambda: history(api, device), what="stored heartbeat")
    assert [(h["msg_id"], h["source"], h["metrics"]) for h in stored] == [
        ("p1", "mqtt", {"cpu": 12.5})
    ]


def test_mosquitto_pub_heartbeat_is_visible_through_the_api(apps: LocalStack, api) -> None:
    device = unique("sensor")
    mosquitto_pub(apps, f"devices/{device}/heartbeat", '{"seq":1,"cpu":12.5}')
    state = poll(lambda: device_state(api, device), what=f"{device} in the API")
    assert state["status"] == "online"
    assert state["metrics"] == {"cpu": 12.5}
    assert len(poll(lambda: history(api, device), what="stored heartbeat")) == 1


def test_http_heartbeat_is_accepted_then_visible(apps: LocalStack, api) -> None:
    device = unique("legacy")
    response = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device}/heartbeats",
        json={"ts": "2026-11-29T10:00:00Z", "seq": 4, "metrics": {"temp_c": 48.2}},
    )
    assert response.status_code == 202, response.text
    heartbeat_id = response.json()["id"]
    state = poll(lambda: device_state(api, device), what=f"{device} in the API")
    assert state["latest_heartbeat"]["id"] == heartbeat_id
    assert state["latest_heartbeat"]["ts"] == "2026-11-29T10:00:00Z"
    assert state["metrics"] == {"temp_c": 48.2}
    assert [h["id"] for h in history(api, device)] == [heartbeat_id]


def test_empty_body_and_seed_shape(apps: LocalStack, api) -> None:
    device = unique("seed")
    mosquitto_pub(apps, f"devices/{device}/heartbeat", json.dumps(SEED_SHAPE))
    assert httpx.post(f"{apps.api_url}/api/v1/devices/{device}/heartbeats").status_code == 202
    stored = poll(lambda: len(history(api, device)) == 2 and history(api, device), what="2 rows")
    assert sorted((h["metrics"] for h in stored), key=len) == [{}, SEED_SHAPE]


def test_bad_payload_is_a_dead_letter_and_the_next_good_one_is_stored(
    apps: LocalStack, api
) -> None:
    device = unique("flaky")
    mosquitto_pub(apps, f"devices/{device}/heartbeat", '{"cpu": NaN}')
    mosquitto_pub(apps, f"devices/{device}/heartbeat", '{"seq": 2, "cpu": 1}')

    def dead_letters() -> list[dict]:
        return api.get("/api/v1/rejected", params={"device_id": device}).json()["items"]

    dead = poll(dead_letters, what="the dead letter")
    assert [(d["reason"], d["source"], d["payload"]) for d in dead] == [
        ("non_finite_number", "mqtt", '{"cpu": NaN}')
    ]
    assert dead[0]["topic"] == f"devices/{device}/heartbeat"
    assert "NaN" in dead[0]["detail"]
    stored = poll(lambda: history(api, device), what="the good heartbeat")
    assert [h["seq"] for h in stored] == [2]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 415, "not JSON"),
        (b"[1]", 422, "JSON object"),
        (b'{"cpu": NaN}', 422, "NaN"),
        (b'{"seq": -3}', 422, "seq"),
        (b'{"x": "' + b"y" * 17000 + b'"}', 413, "limit"),
    ],
)
def test_http_bad_input_gets_a_specific_4xx(
    apps: LocalStack, api, body: bytes, status: int, words: str
) -> None:
    device = unique("bad")
    response = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device}/heartbeats",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    dead = poll(
        lambda: api.get("/api/v1/rejected", params={"device_id": device}).json()["items"],
        what="the HTTP dead letter",
    )
    assert dead[0]["source"] == "http"


def test_bad_device_id_over_http(apps: LocalStack) -> None:
    response = httpx.post(f"{apps.api_url}/api/v1/devices/{'x' * 65}/heartbeats", json={})
    assert response.status_code == 422
    assert "device id" in response.json()["detail"]


def test_status_message_and_fleet(apps: LocalStack, api) -> None:
    device = unique("will")
    mosquitto_pub(apps, f"devices/{device}/heartbeat", "")
    poll(lambda: device_state(api, device), what="device seen")
    mosquitto_pub(apps, f"devices/{device}/status", "offline")
    state = poll(
        lambda: (s := device_state(api, device)) and s["status"] == "offline" and s,
        what="offline after its status message",
    )
    assert state["reported_status"] == "offline"
    fleet = api.get("/api/v1/fleet").json()
    assert fleet["offline"] >= 1
    assert fleet["total"] == fleet["online"] + fleet["offline"] + fleet["never_seen"]


def test_operator_endpoints_need_the_operator_token(apps: LocalStack) -> None:
    for path in ("/api/v1/devices", "/api/v1/devices/x", "/api/v1/rejected", "/api/v1/fleet"):
        assert httpx.get(apps.api_url + path).status_code == 401
        wrong = httpx.get(apps.api_url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "token" in wrong.json()["detail"]


def test_device_list_pages_with_a_cursor(apps: LocalStack, api) -> None:
    prefix = unique("page")
    for i in range(3):
        mosquitto_pub(apps, f"devices/{prefix}-{i}/heartbeat", "{}")
    poll(lambda: device_state(api, f"{prefix}-2"), what="last device")
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/v1/devices", params=params).json()
        seen += [d["device_id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [f"{prefix}-{i}" for i in range(3)] == [d for d in seen if d.startswith(prefix)]
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert api.get("/api/v1/devices", params={"cursor": "garbage"}).status_code == 400


def test_health_endpoints(apps: LocalStack) -> None:
    for port in (apps.ports.api, apps.ports.bridge_health, apps.ports.worker_health):
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["ready"] is True
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "gateway_" in metrics


def test_readme_device_example_runs(apps: LocalStack, api) -> None:
    device = unique("example")
    env = {"DEVICE_ID": device, "MQTT_PORT": str(apps.ports.mqtt), "COUNT": "3", "INTERVAL": "0"}
    subprocess.run(
        [sys.executable, "examples/paho_device.py"],
        env={**os.environ, **env},
        check=True,
        timeout=30,
        cwd=Path(__file__).parent.parent,
    )
    stored = poll(lambda: len(history(api, device)) == 3 and history(api, device), what="3 rows")
    assert sorted(h["seq"] for h in stored) == [0, 1, 2]
    # The script ends without DISCONNECT, so the broker publishes its Last Will.
    state = poll(
        lambda: (s := device_state(api, device)) and s["reported_status"] == "offline" and s,
        what="the Last Will",
    )
    assert state["status"] == "offline"
