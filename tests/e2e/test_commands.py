"""Commands to devices on the real stack: send, deliver (MQTT and HTTP), reply, expire, cancel,
dead letters, and the operator's interval change."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from support import Device, poll, run_readme_blocks

from gateway.contract.commands import CommandRequest
from gateway.storage import command_store

pytestmark = pytest.mark.e2e


class CommandClient:
    """A paho device that collects its commands (each delivery, repeats included)."""

    def __init__(self, port: int, device: Device, *, clean_session: bool = True) -> None:
        self.device = device
        self.received: queue.Queue[dict] = queue.Queue()
        self.raw: list[bytes] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        self.client.username_pw_set(device.device_id, device.token)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(10), "not subscribed"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(f"devices/{self.device.device_id}/commands", qos=1)

    def _on_message(self, client, userdata, message) -> None:
        self.raw.append(message.payload)
        self.received.put(json.loads(message.payload))

    def next(self, timeout: float = 10.0) -> dict:
        return self.received.get(timeout=timeout)

    def reply(self, command_id: str, status: str = "succeeded", result: dict | None = None):
        body = json.dumps({"id": command_id, "status": status, "result": result or {}})
        info = self.client.publish(f"devices/{self.device.device_id}/replies", body, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def command_client(apps, device: Device, **kw) -> Iterator[CommandClient]:
    client = CommandClient(apps.ports.mqtt, device, **kw)
    try:
        yield client
    finally:
        client.close()


def command(api: httpx.Client, command_id: str) -> dict:
    response = api.get(f"/api/v1/commands/{command_id}")
    assert response.status_code == 200, response.text
    return response.json()


def status_becomes(api: httpx.Client, command_id: str, wanted: str, timeout: float = 15.0):
    return poll(
        lambda: (c := command(api, command_id))["status"] == wanted and c,
        timeout=timeout,
        what=f"command {command_id} {wanted}",
    )


def send(api: httpx.Client, device_id: str, name: str = "reboot", **fields) -> dict:
    response = api.post(f"/api/v1/devices/{device_id}/commands", json={"name": name, **fields})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending" and body["device_id"] == device_id
    return body


def dead_letters(api: httpx.Client, device_id: str) -> list[dict]:
    return api.get("/api/v1/rejected", params={"device_id": device_id}).json()["items"]


def test_mqtt_device_receives_a_command_and_its_reply_is_stored_once(apps, api, device) -> None:
    with command_client(apps, device) as client:
        sent = send(api, device.device_id, args={"delay_s": 1}, ttl_s=120)
        got = client.next()
        assert set(got) == {"id", "name", "args", "expires_at"}
        assert got["id"] == sent["id"] and got["name"] == "reboot" and got["args"] == {"delay_s": 1}
        shown = status_becomes(api, sent["id"], "sent")
        assert shown["sent_via"] == "mqtt"
        for _ in range(3):  # the same reply three times: stored once
            client.reply(got["id"], "succeeded", {"uptime_s": 0})
        done = status_becomes(api, sent["id"], "succeeded")
        assert done["result"] == {"uptime_s": 0}
        # A marker behind the repeats on the same path (the device's replies go through one
        # queue, in order): once its dead letter shows, the repeats were applied before it.
        marker = str(uuid.uuid4())
        client.reply(marker, "succeeded")
        poll(
            lambda: any(marker in d["detail"] for d in dead_letters(api, device.device_id)),
            what="the marker reply's dead letter",
        )
        assert command(api, sent["id"]) == done  # the repeats changed nothing
        assert not [
            d
            for d in dead_letters(api, device.device_id)
            if "reply" in d["detail"] and marker not in d["detail"]
        ]
    worker_metrics = httpx.get(f"http://127.0.0.1:{apps.ports.worker_health}/metrics").text
    assert 'gateway_command_changes_total{status="succeeded"}' in worker_metrics


def test_http_device_gets_commands_in_its_heartbeat_answer_and_replies(apps, api, device):
    sent = send(api, device.device_id, name="set_led", args={"on": True})
    url = f"{apps.api_url}/api/v1/devices/{device.device_id}"
    first = httpx.post(f"{url}/heartbeats", json={"seq": 1}, headers=device.auth)
    assert first.status_code == 202, first.text
    handed = first.json()["commands"]
    assert [c["id"] for c in handed] == [sent["id"]]
    assert status_becomes(api, sent["id"], "sent")["status"] == "sent"
    again = httpx.post(f"{url}/heartbeats", json={"seq": 2}, headers=device.auth).json()
    assert [c["id"] for c in again["commands"]] == [sent["id"]]  # live until it replies
    for _ in range(2):
        answer = httpx.post(
            f"{url}/commands/{sent['id']}/reply",
            json={"status": "failed", "result": {"error": "no led"}},
            headers=device.auth,
        )
        assert answer.status_code == 202, answer.text
    done = status_becomes(api, sent["id"], "failed")
    assert done["result"] == {"error": "no led"}
    after = httpx.post(f"{url}/heartbeats", json={"seq": 3}, headers=device.auth).json()
    assert after["commands"] == []


def test_long_poll_answers_when_a_command_arrives(apps, api, device) -> None:
    url = f"{apps.api_url}/api/v1/devices/{device.device_id}/commands/next"
    empty = httpx.get(url, params={"wait": 0}, headers=device.auth)
    assert empty.status_code == 200 and empty.json() == {"commands": []}
    results: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: results.append(
            httpx.get(url, params={"wait": 20}, headers=device.auth, timeout=30)
        )
    )
    started = time.monotonic()
    waiter.start()
    time.sleep(0.5)
    sent = send(api, device.device_id)
    waiter.join(30)
    assert results and results[0].status_code == 200
    assert [c["id"] for c in results[0].json()["commands"]] == [sent["id"]]
    assert time.monotonic() - started < 10
    other = httpx.get(url, headers={"Authorization": "Bearer nope"})
    assert other.status_code == 401
    assert httpx.get(url, params={"wait": 61}, headers=device.auth).status_code == 422


def test_persistent_session_gets_live_commands_on_reconnect_never_expired_ones(
    apps, api, device
) -> None:
    with command_client(apps, device, clean_session=False):
        pass  # the session and its subscription stay on the broker
    short = send(api, device.device_id, name="short", ttl_s=2)
    live = send(api, device.device_id, name="live", ttl_s=300)
    status_becomes(api, short["id"], "sent")
    status_becomes(api, live["id"], "sent")
    status_becomes(api, short["id"], "expired")  # while the device is away
    with command_client(apps, device, clean_session=False) as client:
        got = client.next()
        assert got["id"] == live["id"]
        time.sleep(1)
        assert client.received.empty(), "an expired command was delivered"
        assert all(json.loads(raw)["id"] != short["id"] for raw in client.raw)
        client.reply(live["id"])
        status_becomes(api, live["id"], "succeeded")
    assert status_becomes(api, short["id"], "expired")["finished_at"]


def test_replies_to_unknown_foreign_and_expired_commands_are_dead_letters(
    apps, api, register
) -> None:
    mine, other = register("mine"), register("other")
    theirs = send(api, other.device_id, ttl_s=300)
    expiring = send(api, mine.device_id, ttl_s=1)
    status_becomes(api, expiring["id"], "expired", timeout=20)
    with command_client(apps, mine) as client:
        client.reply(str(uuid.uuid4()))
        client.reply(theirs["id"])
        client.reply(expiring["id"])
        client.client.publish(f"devices/{mine.device_id}/replies", b"{not json", qos=1)

        def reasons() -> list[str]:
            return sorted(d["reason"] for d in dead_letters(api, mine.device_id))

        expected = ["command_expired", "foreign_command", "not_json", "unknown_command"]
        poll(lambda: reasons() == expected, what=f"dead letters {expected}")
    assert command(api, theirs["id"])["status"] in ("pending", "sent")  # untouched


def test_operator_endpoints_list_show_cancel(apps, api, engine, device) -> None:
    first = send(api, device.device_id, name="a")
    second = send(api, device.device_id, name="b")
    page = api.get(f"/api/v1/devices/{device.device_id}/commands", params={"limit": 1}).json()
    assert [c["id"] for c in page["items"]] == [second["id"]]
    rest = api.get(
        f"/api/v1/devices/{device.device_id}/commands",
        params={"limit": 1, "cursor": page["next_cursor"]},
    ).json()
    assert [c["id"] for c in rest["items"]] == [first["id"]]
    status_becomes(api, first["id"], "sent")
    refused = api.delete(f"/api/v1/commands/{first['id']}")
    assert refused.status_code == 409 and "sent" in refused.json()["detail"]
    assert api.get(f"/api/v1/commands/{uuid.uuid4()}").status_code == 404
    assert api.post("/api/v1/devices/nobody-here/commands", json={"name": "x"}).status_code == 404
    bad = api.post(f"/api/v1/devices/{device.device_id}/commands", json={"name": "a b"})
    assert bad.status_code == 422
    # A pending command (stored straight, as if no dispatcher had run yet) can be cancelled.
    with engine.begin() as conn:
        pending = command_store.create(conn, device.device_id, CommandRequest(name="later"))
        conn.execute(
            command_store.commands.update()
            .where(command_store.commands.c.id == pending.id)
            .values(status="pending")
        )
    cancelled = api.delete(f"/api/v1/commands/{pending.id}")
    if cancelled.status_code == 409:  # the dispatcher was quicker: it is (being) sent
        status_becomes(api, str(pending.id), "sent")
    else:
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    filtered = api.get(
        f"/api/v1/devices/{device.device_id}/commands", params={"status": "sent"}
    ).json()
    assert all(c["status"] == "sent" for c in filtered["items"])


def test_interval_change_sends_set_heartbeat_interval(apps, api, device) -> None:
    with command_client(apps, device) as client:
        changed = api.patch(f"/api/v1/devices/{device.device_id}", json={"heartbeat_interval_s": 7})
        assert changed.status_code == 200, changed.text
        got = client.next()
        assert got["name"] == "set_heartbeat_interval"
        assert got["args"] == {"heartbeat_interval_s": 7}
        client.reply(got["id"], "succeeded", {"heartbeat_interval_s": 7})
        status_becomes(api, got["id"], "succeeded")


def test_status_changes_are_events_on_the_stream(apps, api, device) -> None:
    """`?commands=true` adds `event: command` frames; a client that did not ask gets none."""
    seen: dict[bool, list[tuple[str, dict]]] = {True: [], False: []}
    ready = {True: threading.Event(), False: threading.Event()}

    def listen(commands: bool) -> None:
        with httpx.stream(
            "GET",
            f"{apps.api_url}/api/v1/events/stream",
            params={"commands": "true"} if commands else {},
            headers=api.headers,
            timeout=httpx.Timeout(20, read=5),
        ) as stream:
            event = None
            try:
                for line in stream.iter_lines():
                    if line.startswith(": connected"):
                        ready[commands].set()
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        seen[commands].append((event, json.loads(line[6:])))
            except httpx.ReadTimeout:
                return  # quiet for 5 s: done

    listeners = [threading.Thread(target=listen, args=(c,), daemon=True) for c in ready]
    for listener in listeners:
        listener.start()
    assert all(r.wait(10) for r in ready.values())
    sent = send(api, device.device_id)
    status_becomes(api, sent["id"], "sent")
    for listener in listeners:
        listener.join(30)
    mine = [e["status"] for kind, e in seen[True] if kind == "command" and e["id"] == sent["id"]]
    assert mine == ["pending", "sent"]
    assert all(kind == "status" for kind, _ in seen[False])


def test_readme_commands_block_works_as_written(apps, api) -> None:
    """The provisioning block, then the commands block: the command reaches mosquitto_sub,
    mosquitto_pub's reply makes it `succeeded`."""
    _, done = run_readme_blocks(apps, "provisioning", "commands")
    delivered = re.search(r'\{"id":"([0-9a-f-]{36})","name":"reboot"', done.stdout)
    assert delivered, done.stdout
    command_id = delivered.group(1)
    assert status_becomes(api, command_id, "succeeded")["args"] == {"delay_s": 5}


def test_the_example_device_handles_reboot_and_set_interval(apps, api, device) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "paho_commands.py"
    env = {
        **os.environ,
        "DEVICE_ID": device.device_id,
        "DEVICE_TOKEN": device.token,
        "MQTT_PORT": str(apps.ports.mqtt),
        "INTERVAL": "1",
        "DURATION": "20",
    }
    process = subprocess.Popen([sys.executable, str(example)], env=env)
    try:
        poll(
            lambda: api.get(f"/api/v1/devices/{device.device_id}").json()["status"] == "online",
            what="the example device online",
        )
        reboot = send(api, device.device_id, name="reboot")
        api.patch(f"/api/v1/devices/{device.device_id}", json={"heartbeat_interval_s": 2})
        assert status_becomes(api, reboot["id"], "succeeded")["result"] == {"rebooting_in_s": 1}
        interval = poll(
            lambda: [
                c
                for c in api.get(f"/api/v1/devices/{device.device_id}/commands").json()["items"]
                if c["name"] == "set_heartbeat_interval" and c["status"] == "succeeded"
            ],
            what="set_heartbeat_interval succeeded",
        )
        assert interval[0]["result"] == {"heartbeat_interval_s": 2.0}
    finally:
        process.terminate()
        process.wait(10)


def test_cli_sends_lists_shows_and_cancels(apps, api, device) -> None:
    env = {**os.environ, "GATEWAY_DATABASE_URL": apps.database_url}
    gateway = [str(Path(sys.executable).parent / "gateway"), "commands"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*gateway, *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )

    sent = cli("send", device.device_id, "reboot", "--args", '{"delay_s": 3}', "--ttl", "60")
    assert sent.returncode == 0, sent.stderr
    command_id = json.loads(sent.stdout)["id"]
    status_becomes(api, command_id, "sent")  # the api's dispatcher heard of it
    listed = cli("list", device.device_id)
    assert command_id in listed.stdout and "sent" in listed.stdout
    assert json.loads(cli("show", command_id).stdout)["args"] == {"delay_s": 3}
    refused = cli("cancel", command_id)
    assert refused.returncode == 1 and "only a pending" in refused.stderr
    assert cli("send", "no-such-device", "reboot").returncode == 1
    assert cli("send", device.device_id, "bad name").returncode == 1


def test_a_device_that_was_away_gets_its_live_commands_when_it_comes_online(
    apps, api, device
) -> None:
    """Sent while the device had no session at all (the broker kept no copy for it): it is
    published again when the device shows it is back (its first heartbeat)."""
    sent = send(api, device.device_id, ttl_s=300)
    status_becomes(api, sent["id"], "sent")
    with command_client(apps, device) as client:  # a clean session, subscribed
        client.client.publish(f"devices/{device.device_id}/heartbeat", b"{}", qos=1)
        got = client.next(timeout=15)
        assert got["id"] == sent["id"]
        client.reply(got["id"])
        status_becomes(api, sent["id"], "succeeded")


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 415, "not_json"),
        (b'{"status": "succeeded", "result": {"n": 1' + b"0" * 30 + b"}}", 422, "invalid_field"),
        (b'{"status": "done"}', 422, "invalid_field"),
        (b'{"id": "other", "status": "succeeded"}', 422, "invalid_field"),
        (b"[" * 5000 + b"]" * 5000, 422, "too_deep"),
        (b'{"status": "succeeded", "result": {"x": "' + b"a" * 20000 + b'"}}', 413, "too_large"),
        (b"\xff\xfe", 415, "not_utf8"),
    ],
)
def test_a_hostile_http_reply_is_refused_and_dead_lettered(
    apps, api, device, body: bytes, status: int, reason: str | None
) -> None:
    sent = send(api, device.device_id)
    answer = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device.device_id}/commands/{sent['id']}/reply",
        content=body,
        headers={**device.auth, "Content-Type": "application/json"},
    )
    assert answer.status_code == status, answer.text
    letters = poll(lambda: dead_letters(api, device.device_id), what="the dead letter")
    if reason is not None:
        assert letters[0]["reason"] == reason
    assert command(api, sent["id"])["status"] in ("pending", "sent")
