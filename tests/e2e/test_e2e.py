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
from support import (
    SEED_SHAPE,
    Device,
    history,
    poll,
    run_readme_blocks,
    unavailable,
)

from gateway.devtools.localstack import LocalStack

pytestmark = [pytest.mark.e2e]


def device_state(api: httpx.Client, device: str) -> dict | None:
    response = api.get(f"/api/v1/devices/{device}")
    return response.json() if response.status_code == 200 else None


def paho_publish(stack: LocalStack, device: Device, topic: str, payload: bytes) -> None:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(device.device_id, device.token)
    client.connect("127.0.0.1", stack.ports.mqtt, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), "no PUBACK from the broker"
    finally:
        client.disconnect()
        client.loop_stop()


def mosquitto_pub(stack: LocalStack, device: Device, kind: str, message: str) -> None:
    """The README's command line, with the device's credentials."""
    if shutil.which("mosquitto_pub") is None:
        unavailable("mosquitto_pub is missing (apt-get install mosquitto-clients)")
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(stack.ports.mqtt), "-q", "1"]
    credentials = ["-i", device.device_id, "-u", device.device_id, "-P", device.token]
    subprocess.run(
        [*command, *credentials, "-t", f"devices/{device.device_id}/{kind}", "-m", message],
        check=True,
        timeout=20,
    )


def post(stack: LocalStack, device: Device, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{stack.api_url}/api/v1/devices/{device.device_id}/heartbeats",
        headers={**device.auth, **kwargs.pop("headers", {})},
        **kwargs,
    )


def test_paho_qos1_heartbeat_is_visible_through_the_api(apps, api, device: Device) -> None:
    d = device.device_id
    paho_publish(apps, device, f"devices/{d}/heartbeat", b'{"seq": 1, "cpu": 12.5, "msg_id": "p1"}')
    state = poll(lambda: (s := device_state(api, d)) and s["last_seen"] and s, what="last_seen")
    assert state["status"] == "online"
    assert state["metrics"] == {"cpu": 12.5}
    assert state["latest_heartbeat"]["seq"] == 1
    stored = poll(lambda: history(api, d), what="stored heartbeat")
    assert [(h["msg_id"], h["source"], h["metrics"]) for h in stored] == [
        ("p1", "mqtt", {"cpu": 12.5})
    ]


def test_mosquitto_pub_heartbeat_is_visible_through_the_api(apps, api, device: Device) -> None:
    assert device_state(api, device.device_id)["status"] == "never_seen"
    mosquitto_pub(apps, device, "heartbeat", '{"seq":1,"cpu":12.5}')
    state = poll(lambda: seen(api, device), what=f"{device.device_id} seen")
    assert state["status"] == "online"
    assert state["metrics"] == {"cpu": 12.5}
    # A marker down the same path: once it is stored, a late copy of the first would be too.
    mosquitto_pub(apps, device, "heartbeat", '{"seq":2}')
    stored = poll(lambda: len(history(api, device.device_id)) > 1, what="the marker")
    assert stored and [h["seq"] for h in history(api, device.device_id)] == [2, 1]


def test_http_heartbeat_is_accepted_then_visible(apps, api, device: Device) -> None:
    response = post(
        apps, device, json={"ts": "2026-11-29T10:00:00Z", "seq": 4, "metrics": {"temp_c": 48.2}}
    )
    assert response.status_code == 202, response.text
    heartbeat_id = response.json()["id"]
    state = poll(lambda: seen(api, device), what=f"{device.device_id} seen")
    assert state["latest_heartbeat"]["id"] == heartbeat_id
    assert state["latest_heartbeat"]["ts"] == "2026-11-29T10:00:00Z"
    assert state["metrics"] == {"temp_c": 48.2}
    marker = post(apps, device, json={"seq": 5}).json()["id"]  # stored after any late copy
    poll(lambda: len(history(api, device.device_id)) > 1, what="the marker")
    assert [h["id"] for h in history(api, device.device_id)] == [marker, heartbeat_id]


def test_empty_body_and_seed_shape(apps, api, device: Device) -> None:
    mosquitto_pub(apps, device, "heartbeat", json.dumps(SEED_SHAPE))
    assert post(apps, device).status_code == 202
    d = device.device_id
    stored = poll(lambda: len(history(api, d)) == 2 and history(api, d), what="2 rows")
    assert sorted((h["metrics"] for h in stored), key=len) == [{}, SEED_SHAPE]


def test_bad_payload_is_a_dead_letter_and_the_next_good_one_is_stored(
    apps, api, device: Device
) -> None:
    mosquitto_pub(apps, device, "heartbeat", '{"cpu": NaN}')
    mosquitto_pub(apps, device, "heartbeat", '{"seq": 2, "cpu": 1}')
    dead = poll(lambda: dead_letters(api, device), what="the dead letter")
    assert [(d["reason"], d["source"], d["payload"]) for d in dead] == [
        ("non_finite_number", "mqtt", '{"cpu": NaN}')
    ]
    assert dead[0]["topic"] == f"devices/{device.device_id}/heartbeat"
    assert "NaN" in dead[0]["detail"]
    stored = poll(lambda: history(api, device.device_id), what="the good heartbeat")
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
    apps, api, device: Device, body: bytes, status: int, words: str
) -> None:
    response = post(apps, device, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    dead = poll(lambda: dead_letters(api, device), what="the HTTP dead letter")
    assert dead[0]["source"] == "http"


def test_bad_device_id_over_http(apps) -> None:
    response = httpx.post(f"{apps.api_url}/api/v1/devices/{'x' * 65}/heartbeats", json={})
    assert response.status_code == 422
    assert "device id" in response.json()["detail"]


def test_status_message_and_fleet(apps, api, device: Device) -> None:
    mosquitto_pub(apps, device, "heartbeat", "")
    poll(lambda: seen(api, device), what="device seen")
    mosquitto_pub(apps, device, "status", "offline")
    state = poll(
        lambda: (s := device_state(api, device.device_id)) and s["status"] == "offline" and s,
        what="offline after its status message",
    )
    assert state["status_reason"] == "last_will"
    fleet = api.get("/api/v1/fleet").json()
    assert fleet["offline"] >= 1
    assert fleet["total"] == fleet["online"] + fleet["offline"] + fleet["never_seen"]


def test_operator_endpoints_need_the_operator_token(apps, device: Device) -> None:
    for path in ("/api/v1/devices", "/api/v1/devices/x", "/api/v1/rejected", "/api/v1/fleet"):
        assert httpx.get(apps.api_url + path).status_code == 401
        wrong = httpx.get(apps.api_url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "token" in wrong.json()["detail"]
        # A device token is not an operator token.
        assert httpx.get(apps.api_url + path, headers=device.auth).status_code == 401


def test_device_list_pages_with_a_cursor(api, register) -> None:
    devices = [register("page").device_id for _ in range(3)]
    seen_ids, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/v1/devices", params=params).json()
        seen_ids += [d["device_id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(devices) <= set(seen_ids)
    assert seen_ids == sorted(seen_ids) and len(seen_ids) == len(set(seen_ids))
    assert api.get("/api/v1/devices", params={"cursor": "garbage"}).status_code == 400


def listed(api: httpx.Client, status: str) -> set[str]:
    """Every device the list shows with `status` (every page)."""
    found, cursor = set(), None
    while True:
        params = {"status": status, "limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/v1/devices", params=params)
        assert page.status_code == 200, page.text
        found |= {d["device_id"] for d in page.json()["items"]}
        assert all(d["status"] == status for d in page.json()["items"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return found


def test_device_list_filters_by_status(apps, api, register) -> None:
    quiet, alive, gone = (register("filter", heartbeat_interval_s=3600) for _ in range(3))
    for device in (alive, gone):
        response = httpx.post(
            f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats",
            json={},
            headers=device.auth,
        )
        assert response.status_code == 202, response.text
    poll(lambda: seen(api, alive) and seen(api, gone), what="both seen")
    mosquitto_pub(apps, gone, "status", "offline")
    poll(lambda: device_state(api, gone.device_id)["status"] == "offline", what="gone offline")
    ours = {d.device_id for d in (quiet, alive, gone)}
    assert listed(api, "never_seen") & ours == {quiet.device_id}
    assert listed(api, "online") & ours == {alive.device_id}
    assert listed(api, "offline") & ours == {gone.device_id}


def test_a_disabled_device_is_refused_until_enabled_again(apps, api, device: Device) -> None:
    url = f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats"
    assert api.patch(f"/api/v1/devices/{device.device_id}", json={"enabled": False}).is_success
    refused = httpx.post(url, json={"msg_id": "while-disabled"}, headers=device.auth)
    assert refused.status_code == 403, refused.text
    assert api.patch(f"/api/v1/devices/{device.device_id}", json={"enabled": True}).is_success
    accepted = httpx.post(url, json={"msg_id": "enabled-again"}, headers=device.auth)
    assert accepted.status_code == 202, accepted.text
    stored = poll(lambda: history(api, device.device_id), what="stored once enabled")
    assert [h["msg_id"] for h in stored] == ["enabled-again"]


def test_health_endpoints(apps) -> None:
    for port in (apps.ports.api, apps.ports.bridge_health, apps.ports.worker_health):
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["ready"] is True
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "gateway_" in metrics


def test_readme_device_example_runs(apps, api, device: Device) -> None:
    env = {
        "DEVICE_ID": device.device_id,
        "DEVICE_TOKEN": device.token,
        "MQTT_PORT": str(apps.ports.mqtt),
        "COUNT": "3",
        "INTERVAL": "0",
    }
    subprocess.run(
        [sys.executable, "examples/paho_device.py"],
        env={**os.environ, **env},
        check=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    d = device.device_id
    stored = poll(lambda: len(history(api, d)) == 3 and history(api, d), what="3 rows")
    assert sorted(h["seq"] for h in stored) == [0, 1, 2]
    # The script ends without DISCONNECT, so the broker publishes its Last Will.
    state = poll(
        lambda: (s := device_state(api, d)) and s["status"] == "offline" and s,
        what="the Last Will",
    )
    assert state["status_reason"] == "last_will"


def seen(api: httpx.Client, device: Device) -> dict | None:
    state = device_state(api, device.device_id)
    return state if state and state["last_seen"] else None


def dead_letters(api: httpx.Client, device: Device) -> list[dict]:
    return api.get("/api/v1/rejected", params={"device_id": device.device_id}).json()["items"]


def test_readme_provisioning_block_works_as_written(apps, api) -> None:
    device, done = run_readme_blocks(apps, "provisioning")
    assert '"id":' in done.stdout
    stored = poll(lambda: len(history(api, device)) == 2 and history(api, device), what="2 rows")
    assert sorted(h["source"] for h in stored) == ["http", "mqtt"]


def test_worker_reports_queue_depths(apps) -> None:
    def depths() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{apps.ports.worker_health}/metrics").text
        return {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_queue_depth_messages{")
        }

    found = poll(lambda: len(d := depths()) == 3 and d, timeout=20, what="three queue depths")
    assert set(found) == {"gateway.mqtt.inbox", "gateway.heartbeats", "gateway.rejected"}
    assert all(value >= 0 for value in found.values())
