"""Device identity and access control, against the real broker and api.

MQTT username = device id, password = its token; RabbitMQ asks the api (its internal listener)
for every login and caches permission checks. HTTP ingest takes the same token as a bearer.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
from pathlib import Path

import aio_pika
import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine
from support import Device, MqttSession, history, poll, unique

from gateway.amqp import accounts
from gateway.devtools.localstack import LocalStack
from gateway.runtime.settings import ApiSettings
from gateway.storage import registry

pytestmark = pytest.mark.e2e


class Session(MqttSession):
    """A device's (or anyone's) MQTT session with the test stack's broker."""

    def __init__(
        self, stack: LocalStack, username: str | None, password: str | None, client_id: str
    ) -> None:
        super().__init__(stack.ports.mqtt, username, password, client_id)


def connect(
    stack: LocalStack,
    device: Device | None,
    *,
    password: str | None = None,
    username: str | None = None,
    client_id: str | None = None,
) -> Session:
    name = username if username is not None else (device.device_id if device else None)
    secret = password if password is not None else (device.token if device else None)
    return Session(stack, name, secret, client_id or name or unique("anon"))


def beat_and_wait(apps: LocalStack, api: httpx.Client, device: Device, seq: int) -> list[dict]:
    """A heartbeat of the device's own, once stored: everything queued before it is stored too."""
    response = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats",
        json={"seq": seq, "msg_id": f"marker-{seq}"},
        headers=device.auth,
    )
    assert response.status_code == 202, response.text
    return poll(
        lambda: (
            (r := history(api, device.device_id))
            and f"marker-{seq}" in {h["msg_id"] for h in r}
            and r
        ),
        what="the marker heartbeat",
    )


# ---- registration -------------------------------------------------------------------------


def test_register_shows_the_token_once_and_never_again(api, apps) -> None:
    device_id = unique("pump")
    created = api.post("/api/v1/devices", json={"device_id": device_id, "heartbeat_interval_s": 30})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["device_id"] == device_id and body["heartbeat_interval_s"] == 30
    token = body["token"]
    assert len(token) >= 40, "tokens must carry at least 256 bits"
    again = api.post("/api/v1/devices", json={"device_id": device_id})
    assert again.status_code == 409
    shown = api.get(f"/api/v1/devices/{device_id}")
    assert shown.status_code == 200
    assert token not in shown.text and "token" not in shown.json()
    assert shown.json()["status"] == "never_seen" and shown.json()["enabled"] is True
    listed = api.get("/api/v1/devices").text
    assert token not in listed


@pytest.mark.parametrize(
    ("device_id", "words"),
    [("gateway-bridge", "reserved"), ("a.b", "device_id"), ("x" * 65, "device_id")],
)
def test_register_refuses_bad_or_reserved_ids(api, device_id: str, words: str) -> None:
    response = api.post("/api/v1/devices", json={"device_id": device_id})
    assert response.status_code == 422
    assert words in response.json()["detail"]


def test_registration_needs_the_operator_token(apps) -> None:
    response = httpx.post(f"{apps.api_url}/api/v1/devices", json={"device_id": unique()})
    assert response.status_code == 401


# ---- MQTT ---------------------------------------------------------------------------------


def test_registered_device_connects_and_publishes(apps, api, device: Device) -> None:
    session = connect(apps, device)
    try:
        assert session.accepted
        assert session.publish(f"devices/{device.device_id}/heartbeat", b'{"msg_id": "ok-1"}')
        poll(lambda: history(api, device.device_id), what="row")
        # A marker down the same path: once it is stored, a late copy of ok-1 would be too.
        assert session.publish(f"devices/{device.device_id}/heartbeat", b'{"msg_id": "ok-2"}')
        stored = poll(
            lambda: (rows := history(api, device.device_id)) and len(rows) > 1 and rows,
            what="the marker",
        )
    finally:
        session.close()
    assert sorted(h["msg_id"] for h in stored) == ["ok-1", "ok-2"]


def test_bad_credentials_are_refused_at_connect(apps, api, register) -> None:
    device = register()
    disabled = register()
    assert (
        api.patch(f"/api/v1/devices/{disabled.device_id}", json={"enabled": False}).json()[
            "enabled"
        ]
        is False
    )
    attempts = {
        "wrong password": connect(apps, device, password="gwd_wrong"),
        "another device's token": connect(apps, device, password=disabled.token),
        "unknown device": connect(apps, None, username=unique("ghost"), password=device.token),
        "disabled device": connect(apps, disabled),
        "anonymous": connect(apps, None, client_id=unique("anon")),
    }
    for what, session in attempts.items():
        assert not session.accepted, f"{what}: CONNECT was accepted"
        session.close()
    # Nothing was stored for them: a marker of the device's own is the only row.
    assert [h["msg_id"] for h in beat_and_wait(apps, api, device, 1)] == ["marker-1"]
    assert history(api, disabled.device_id) == []


def test_a_device_cannot_publish_as_another(apps, api, register) -> None:
    a, b = register("a"), register("b")
    session = connect(apps, a)
    try:
        assert session.accepted
        assert not session.publish(f"devices/{b.device_id}/heartbeat", b'{"msg_id": "forged"}')
    finally:
        session.close()
    assert [h["msg_id"] for h in beat_and_wait(apps, api, b, 1)] == ["marker-1"]


@pytest.mark.parametrize("kind", ["replies", "status"])
def test_a_device_replies_only_for_itself(apps, api, register, kind: str) -> None:
    """Its own replies topic is open to it; another device's is not (the broker closes the
    connection: MQTT 3.1.1 has no refusal for a publish)."""
    a, b = register("a"), register("b")
    session = connect(apps, a)
    try:
        assert session.publish(f"devices/{a.device_id}/{kind}", b"online")
        assert not session.publish(f"devices/{b.device_id}/{kind}", b"online")
    finally:
        session.close()


@pytest.mark.parametrize(
    "topic",
    ["devices/{other}/commands", "devices/{other}/replies", "devices/+/commands", "devices/#", "#"],
)
def test_a_device_cannot_subscribe_beyond_its_commands(apps, register, topic: str) -> None:
    a, b = register("a"), register("b")
    session = connect(apps, a)
    try:
        assert session.accepted
        assert not session.subscribe_granted(topic.format(other=b.device_id))
    finally:
        session.close()


def test_a_device_reads_its_own_commands(apps, stack, device: Device) -> None:
    session = connect(apps, device)
    try:
        assert session.subscribe_granted(f"devices/{device.device_id}/commands")

        async def send() -> None:
            async with await aio_pika.connect(stack.amqp_url_for(accounts.API)) as conn:
                channel = await conn.channel()
                exchange = await channel.get_exchange("amq.topic")
                await exchange.publish(
                    aio_pika.Message(b"reboot"), f"devices.{device.device_id}.commands"
                )

        asyncio.run(send())
        poll(lambda: session.messages, what="the command")
        assert session.messages[0].payload == b"reboot"
    finally:
        session.close()


def test_rotation_stops_the_old_token_at_once(apps, api, device: Device) -> None:
    url = f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats"
    assert httpx.post(url, json={}, headers=device.auth).status_code == 202  # token now cached
    rotated = api.post(f"/api/v1/devices/{device.device_id}/token")
    assert rotated.status_code == 200
    new = Device(device.device_id, rotated.json()["token"])
    assert new.token != device.token
    old_session = connect(apps, device)
    assert not old_session.accepted, "the old token still logs in over MQTT"
    old_session.close()
    old_http = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats", json={}, headers=device.auth
    )
    assert old_http.status_code == 401
    new_session = connect(apps, new)
    try:
        assert new_session.accepted
        assert new_session.publish(f"devices/{device.device_id}/heartbeat", b"{}")
    finally:
        new_session.close()
    assert (
        httpx.post(
            f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats",
            json={},
            headers=new.auth,
        ).status_code
        == 202
    )


def test_cli_manages_the_registry(apps, api) -> None:
    device_id = unique("cli")
    env = {**apps.env("api"), "PATH": str(Path(__file__).resolve().parents[2] / ".venv" / "bin")}
    gateway = [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "gateway"), "devices"]

    def cli(*args: str) -> str:
        done = subprocess.run(
            [*gateway, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    token = re.search(r"token\s+(\S+)", cli("add", device_id, "--interval", "10")).group(1)
    assert device_id in cli("list")
    assert connect(apps, Device(device_id, token)).accepted
    cli("disable", device_id)
    assert not connect(apps, Device(device_id, token)).accepted
    assert api.get(f"/api/v1/devices/{device_id}").json()["enabled"] is False
    cli("enable", device_id)
    new = re.search(r"token\s+(\S+)", cli("rotate", device_id)).group(1)
    assert not connect(apps, Device(device_id, token)).accepted
    assert connect(apps, Device(device_id, new)).accepted


# ---- HTTP ---------------------------------------------------------------------------------


def test_a_change_made_elsewhere_reaches_the_token_cache(apps, api, device: Device) -> None:
    """Rotated or disabled by another process (here straight in PostgreSQL, as the CLI does):
    the api hears of it by NOTIFY and refuses the cached token within moments."""
    url = f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats"
    assert httpx.post(url, json={}, headers=device.auth).status_code == 202  # token now cached
    engine = create_engine(apps.database_url)
    try:
        with engine.begin() as conn:
            registry.change(conn, device.device_id, registry.DeviceChanges(enabled=False))
        poll(
            lambda: httpx.post(url, json={}, headers=device.auth).status_code == 403,
            timeout=5,
            what="the cached token refused once the device is disabled",
        )
        with engine.begin() as conn:
            registry.change(conn, device.device_id, registry.DeviceChanges(enabled=True))
            issued, _ = registry.rotate(conn, device.device_id)
        poll(
            lambda: httpx.post(url, json={}, headers=device.auth).status_code == 401,
            timeout=5,
            what="the old token refused after a rotation elsewhere",
        )
        new = {"Authorization": f"Bearer {issued.token}"}
        assert httpx.post(url, json={}, headers=new).status_code == 202
    finally:
        engine.dispose()


def test_http_ingest_needs_the_devices_own_token(apps, api, register) -> None:
    a, b = register("a"), register("b")
    url = f"{apps.api_url}/api/v1/devices/{a.device_id}/heartbeats"
    before = auth_failures(apps)
    assert httpx.post(url, json={}).status_code == 401
    assert httpx.post(url, json={}, headers={"Authorization": "Bearer gwd_nope"}).status_code == 401
    other = httpx.post(url, json={}, headers=b.auth)
    assert other.status_code == 403 and b.token not in other.text
    ghost = httpx.post(
        f"{apps.api_url}/api/v1/devices/{unique('ghost')}/heartbeats", json={}, headers=a.auth
    )
    assert ghost.status_code == 403
    unregistered = httpx.post(
        f"{apps.api_url}/api/v1/devices/{unique('ghost')}/heartbeats",
        json={},
        headers={"Authorization": "Bearer gwd_unregistered"},
    )
    assert unregistered.status_code == 401
    assert auth_failures(apps) - before == 5
    api.patch(f"/api/v1/devices/{a.device_id}", json={"enabled": False})
    disabled = httpx.post(url, json={}, headers=a.auth)
    assert disabled.status_code == 403 and "disabled" in disabled.json()["detail"]
    assert history(api, a.device_id) == []


def auth_failures(apps: LocalStack) -> float:
    text = httpx.get(f"{apps.api_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_auth_failures_total{") and 'transport="http"' in line
    )


# ---- the endpoints RabbitMQ calls ---------------------------------------------------------


def test_broker_auth_endpoints_are_not_a_way_in(apps, device: Device) -> None:
    form = {"username": device.device_id, "password": device.token, "client_id": device.device_id}
    public = httpx.post(f"{apps.api_url}/internal/rabbitmq/user", data=form)
    assert public.status_code == 404
    internal = f"http://127.0.0.1:{apps.ports.api_internal}/internal/rabbitmq"
    assert httpx.post(f"{internal}/user", data=form).text == "allow"
    for bad in (
        {**form, "password": "x"},
        {**form, "client_id": "another"},
        {"username": device.device_id, "password": device.token},  # not MQTT: no client id
        {"username": device.device_id, "client_id": device.device_id},
        {"username": "../../etc", "password": device.token, "client_id": "../../etc"},
        {},
    ):
        assert httpx.post(f"{internal}/user", data=bad).text == "deny"
    assert httpx.post(f"{internal}/user", content=b"\xff\xfe" * 5000).text == "deny"
    topic = {
        "username": device.device_id,
        "name": "amq.topic",
        "permission": "write",
        "routing_key": f"devices.{device.device_id}.heartbeat",
        "vhost": "/",
        "resource": "topic",
        "variable_map.client_id": device.device_id,
    }
    assert httpx.post(f"{internal}/topic", data=topic).text == "allow"
    assert (
        httpx.post(f"{internal}/topic", data={**topic, "routing_key": "devices.x.heartbeat"}).text
        == "deny"
    )
    assert "internal" not in httpx.get(f"{apps.api_url}/openapi.json").text


def test_tokens_never_reach_the_logs(apps, api, register) -> None:
    device, other = register(), register()
    logs = list(apps.log_dir.glob("*.log"))
    before = {path: path.stat().st_size for path in logs}
    connect(apps, device, password=other.token).close()  # a real token, of another device
    connect(apps, device, password="gwd_wrong-secret-value").close()  # nobody's
    refused = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats",
        json={},
        headers={"Authorization": "Bearer gwd_wrong-secret-value"},
    )
    assert refused.status_code == 401

    def written() -> str:  # what the services logged since this test began
        text = ""
        for path in logs:
            with path.open("rb") as log:
                log.seek(before[path])
                text += log.read().decode(errors="replace")
        return text

    added = poll(
        lambda: (
            (text := written()) and f"MQTT login refused for {device.device_id!r}" in text and text
        ),
        what="the refused login in the logs",
    )
    everything = "".join(path.read_text(errors="replace") for path in logs)
    for token in (device.token, other.token, "gwd_wrong-secret-value"):
        assert token not in added and token not in everything


# ---- operator token -----------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "changeme", "short", "x" * 32])
def test_api_refuses_an_unsafe_operator_token_outside_development(apps, token: str) -> None:
    deployed = {
        name.removeprefix("GATEWAY_").lower(): value
        for name, value in apps.env("api").items()
        if name.endswith("_URL") and name.startswith("GATEWAY_")
    }
    with pytest.raises(ValidationError, match="GATEWAY_OPERATOR_TOKEN"):
        ApiSettings(environment="production", operator_token=token, **deployed)
    ApiSettings(environment="production", operator_token=secrets.token_urlsafe(32), **deployed)


def test_api_process_will_not_start_with_an_unsafe_token(apps) -> None:
    env = {**apps.env("api"), "GATEWAY_ENVIRONMENT": "production", "GATEWAY_OPERATOR_TOKEN": ""}
    done = subprocess.run(
        [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "gateway-api")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "GATEWAY_OPERATOR_TOKEN" in done.stderr
