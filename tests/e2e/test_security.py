"""A device speaks only for itself, and no account has a known password: tried as an outsider
would, against the real broker, api and worker.

Each test is a row of what an attacker (a hostile device, a leaked token, a stranger on the
network) tries, and what the gateway must answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import stat
import subprocess

import aio_pika
import httpx
import psycopg2
import pytest
from aiormq.exceptions import AMQPError
from sqlalchemy import text
from support import Device, history, poll, unique
from test_access import Session, beat_and_wait, connect

from gateway.amqp import accounts
from gateway.contract.credentials import token_hash
from gateway.devtools.localstack import LocalStack
from gateway.runtime.settings import ApiSettings, BridgeSettings, weak_secret
from gateway.storage import registry

pytestmark = pytest.mark.e2e

KNOWN_PASSWORDS = ("gateway", "guest", "admin", "password")


def amqp_login(stack: LocalStack, user: str, password: str) -> bool:
    async def attempt() -> bool:
        url = f"amqp://{user}:{password}@127.0.0.1:{stack.ports.amqp}/%2F"
        try:
            connection = await aio_pika.connect(url, timeout=10)
        except (AMQPError, ConnectionError, OSError):  # refused: closed during the handshake
            return False
        await connection.close()
        return True

    return asyncio.run(attempt())


def rejected(api: httpx.Client, device_id: str, reason: str | None = None) -> list[dict]:
    params = {"device_id": device_id, **({"reason": reason} if reason else {})}
    return api.get("/api/v1/rejected", params=params).json()["items"]


def metric(stack: LocalStack, name: str, **labels: str) -> float:
    text = httpx.get(f"{stack.api_url}/metrics").text
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in wanted)
    )


# ---- broker accounts ------------------------------------------------------------------------


@pytest.mark.parametrize("account", accounts.ACCOUNT_NAMES)
def test_no_broker_account_has_a_known_password(apps: LocalStack, account: str) -> None:
    for password in (*KNOWN_PASSWORDS, account):
        assert not amqp_login(apps, account, password), f"{account}/{password} logs in"
        session = Session(apps, account, password, account)
        assert not session.accepted, f"{account}/{password} logs in over MQTT"
        session.close()
    # The stack's own password is its own, generated and readable by its owner only; with it
    # a service logs in (so the refusals above are refusals, not a broker that is away).
    if account in accounts.SERVICES:
        assert amqp_login(apps, account, apps.broker_password(account))
    secret = apps.run_dir / "secrets" / f"broker-{account}"
    assert weak_secret(apps.broker_password(account), account) is None
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_the_administrator_cannot_log_in_over_amqp_or_mqtt(apps: LocalStack) -> None:
    password = apps.broker_password(accounts.ADMIN)
    assert not amqp_login(apps, accounts.ADMIN, password)
    session = Session(apps, accounts.ADMIN, password, accounts.ADMIN)
    assert not session.accepted
    session.close()


@pytest.mark.parametrize("account", accounts.SERVICES)
def test_a_service_account_cannot_speak_for_a_device_or_listen(
    apps: LocalStack, api: httpx.Client, device: Device, account: str
) -> None:
    """Even with its password, a service account can neither publish under `devices/` nor
    subscribe to it over MQTT (topic permissions), nor publish there over AMQP."""
    session = Session(apps, account, apps.broker_password(account), account)
    try:
        if session.accepted:
            assert not session.publish(
                f"devices/{device.device_id}/heartbeat", b'{"msg_id": "forged"}'
            )
    finally:
        session.close()
    listener = Session(apps, account, apps.broker_password(account), account)
    try:
        if listener.accepted:
            assert not listener.subscribe_granted("devices/#")
    finally:
        listener.close()

    async def forge() -> bool:
        async with await aio_pika.connect(apps.amqp_url_for(account)) as connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange("amq.topic", ensure=False)
            try:
                await exchange.publish(
                    aio_pika.Message(b'{"msg_id": "forged-amqp"}'),
                    f"devices.{device.device_id}.heartbeat",
                    timeout=10,
                )
            except Exception:
                return False
            return True

    assert not asyncio.run(forge())
    assert [h["msg_id"] for h in beat_and_wait(apps, api, device, 1)] == ["marker-1"]


def test_a_device_token_does_not_open_amqp(apps: LocalStack, device: Device) -> None:
    """RabbitMQ asks the api about AMQP logins too; a device is admitted over MQTT only."""
    assert not amqp_login(apps, device.device_id, device.token)


def test_the_stacks_secrets_are_generated_and_private(apps: LocalStack) -> None:
    folder = apps.run_dir / "secrets"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    names = {path.name for path in folder.iterdir()}
    assert {"postgres", "redis", *(f"broker-{a}" for a in accounts.ACCOUNT_NAMES)} <= names
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert weak_secret(path.read_text().strip()) is None, path
    loaded = apps.definitions_file.read_text()
    assert stat.S_IMODE(apps.definitions_file.stat().st_mode) == 0o600
    for name in accounts.ACCOUNT_NAMES:
        assert apps.broker_password(name) not in loaded  # hashes only
    users = {user["name"] for user in json.loads(loaded)["users"]}
    assert users == set(accounts.ACCOUNT_NAMES)
    # Redis and PostgreSQL refuse a client without the password.
    redis_cli = subprocess.run(
        ["redis-cli", "-p", str(apps.ports.redis), "GET", "x"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert "NOAUTH" in redis_cli.stdout + redis_cli.stderr
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(
            host="127.0.0.1", port=apps.ports.postgres, user="gateway", dbname="gateway"
        ).close()


# ---- a device speaks only for itself ------------------------------------------------------------


def test_a_device_cannot_take_over_another_devices_session(
    apps: LocalStack, api: httpx.Client, register
) -> None:
    a, b = register("a"), register("b")
    owner = connect(apps, a)
    try:
        assert owner.accepted
        intruder = connect(apps, b, client_id=a.device_id)
        assert not intruder.accepted, "a device logged in with another device's client id"
        intruder.close()
        assert not owner.disconnected.is_set(), "the owner's session was taken over"
        assert owner.publish(f"devices/{a.device_id}/heartbeat", b'{"msg_id": "still-mine"}')
        poll(
            lambda: "still-mine" in {h["msg_id"] for h in history(api, a.device_id)},
            what="the owner's heartbeat after the attempt",
        )
    finally:
        owner.close()
    # Its own id with any other client id is refused too (mosquitto_pub's random default).
    stranger_id = connect(apps, a, client_id=unique("mosq"))
    assert not stranger_id.accepted
    stranger_id.close()


@pytest.mark.parametrize("kind", ["commands", "replies-x", "heartbeat/extra", "anything"])
def test_a_device_publishes_only_where_it_means_something(
    apps: LocalStack, device: Device, kind: str
) -> None:
    session = connect(apps, device)
    try:
        assert not session.publish(f"devices/{device.device_id}/{kind}", b"{}")
    finally:
        session.close()


def test_disabling_a_device_closes_its_connection_at_once(
    apps: LocalStack, api: httpx.Client, device: Device
) -> None:
    """The row of the report: a device with an open MQTT connection is disabled, then keeps
    publishing. Nothing after the disable is stored, and the device is shown offline."""
    session = connect(apps, device)
    try:
        assert session.publish(f"devices/{device.device_id}/heartbeat", b'{"msg_id": "before"}')
        poll(
            lambda: api.get(f"/api/v1/devices/{device.device_id}").json()["status"] == "online",
            what="the device online",
        )
        changed = api.patch(f"/api/v1/devices/{device.device_id}", json={"enabled": False})
        assert changed.status_code == 200
        assert changed.json()["status"] == "offline"
        assert changed.json()["status_reason"] == "disabled"
        poll(session.disconnected.is_set, timeout=5, what="the open connection closed")
        for n in range(3):
            assert not session.publish(
                f"devices/{device.device_id}/heartbeat", f'{{"msg_id": "after-{n}"}}'.encode()
            )
    finally:
        session.close()
    again = connect(apps, device)
    assert not again.accepted
    again.close()
    events = api.get(f"/api/v1/devices/{device.device_id}/events").json()["items"]
    assert events[0]["to_status"] == "offline" and events[0]["reason"] == "disabled"
    assert {h["msg_id"] for h in history(api, device.device_id)} == {"before"}
    assert api.get(f"/api/v1/devices/{device.device_id}").json()["status"] == "offline"


def test_rotating_a_token_closes_the_connections_that_used_the_old_one(
    apps: LocalStack, api: httpx.Client, device: Device
) -> None:
    session = connect(apps, device)
    try:
        assert session.accepted
        assert api.post(f"/api/v1/devices/{device.device_id}/token").status_code == 200
        poll(session.disconnected.is_set, timeout=5, what="the old token's connection closed")
    finally:
        session.close()


def test_heartbeats_queued_when_a_device_is_disabled_are_dead_letters(
    apps: LocalStack, api: httpx.Client, device: Device
) -> None:
    """Accepted before the disable, still in the queue after it: dead letters with their own
    reason, never stored as the device's (the worker reads `enabled` under the device's lock)."""
    apps.stop_app("worker")
    try:
        session = connect(apps, device)
        try:
            for n in range(5):
                assert session.publish(
                    f"devices/{device.device_id}/heartbeat", f'{{"msg_id": "q-{n}"}}'.encode()
                )
        finally:
            session.close()
        http = httpx.post(
            f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats",
            json={"msg_id": "q-http"},
            headers=device.auth,
        )
        assert http.status_code == 202
        assert api.patch(f"/api/v1/devices/{device.device_id}", json={"enabled": False}).is_success
    finally:
        apps.start_app("worker")
        apps.wait_apps(("worker",))
    dead = poll(
        lambda: len(r := rejected(api, device.device_id, "device_disabled")) == 6 and r,
        what="six device_disabled dead letters",
    )
    assert {json.loads(d["payload"])["msg_id"] for d in dead} == {
        *(f"q-{n}" for n in range(5)),
        "q-http",
    }
    assert history(api, device.device_id) == []


# ---- strangers --------------------------------------------------------------------------------


def test_a_stranger_guessing_tokens_costs_no_database_query(
    apps: LocalStack, device: Device
) -> None:
    """Tokens that no device has are refused from the api's fingerprints of every token; the
    refusals say so in their own reason, which only a refusal without a query carries."""
    url = f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats"
    http_before = metric(apps, "gateway_auth_failures_total", reason="unknown_token")
    with httpx.Client() as client:
        for _ in range(50):
            guess = {"Authorization": f"Bearer gwd_{unique('guess')}{'x' * 30}"}
            assert client.post(url, json={}, headers=guess).status_code == 401
    assert metric(apps, "gateway_auth_failures_total", reason="unknown_token") - http_before == 50
    for _ in range(5):
        session = connect(apps, device, password=f"gwd_{unique('guess')}")
        assert not session.accepted
        session.close()
    assert (
        metric(apps, "gateway_auth_failures_total", transport="mqtt", reason="unknown_token") >= 5
    )
    # The device's own token still works at once, over both.
    assert httpx.post(url, json={}, headers=device.auth).status_code == 202
    assert connect(apps, device).accepted


def test_a_device_registered_a_moment_ago_is_known_at_once(apps: LocalStack, register) -> None:
    fresh = register("fresh")
    url = f"{apps.api_url}/api/v1/devices/{fresh.device_id}/heartbeats"
    assert httpx.post(url, json={}, headers=fresh.auth).status_code == 202
    session = connect(apps, fresh)
    assert session.accepted
    session.close()


# ---- tokens at rest -----------------------------------------------------------------------------


def holding(engine, redis_client, secrets_: list[str]) -> list[str]:
    """Where PostgreSQL (every table of the schema, as text and as bytes) or Redis (every key
    and value) holds any of these texts."""
    found = []
    with engine.connect() as conn:
        tables = conn.execute(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
            )
        ).scalars()
        for table in list(tables):
            for secret in secrets_:
                count = conn.scalar(
                    text(
                        f'SELECT count(*) FROM "{table}" AS t WHERE strpos(t::text, :s) > 0'
                        " OR strpos(t::text, encode(convert_to(:s, 'UTF8'), 'hex')) > 0"
                    ),
                    {"s": secret},
                )
                if count:
                    found.append(f"PostgreSQL {table}")
    read = {
        b"string": lambda key: [redis_client.get(key)],
        b"hash": lambda key: [b"".join(kv) for kv in redis_client.hgetall(key).items()],
        b"set": lambda key: list(redis_client.smembers(key)),
        b"list": lambda key: redis_client.lrange(key, 0, -1),
        b"zset": lambda key: redis_client.zrange(key, 0, -1),
    }
    for key in redis_client.scan_iter(count=1000):
        values = [key, *read.get(redis_client.type(key), lambda key: [])(key)]
        for secret in secrets_:
            if any(value and secret.encode() in value for value in values):
                found.append(f"Redis {key!r}")
    return found


def test_tokens_are_stored_only_as_a_keyed_hash(
    apps: LocalStack, api: httpx.Client, register, engine, redis_client
) -> None:
    """A device's tokens, the first and its rotation's, each used over HTTP and MQTT (so every
    cache has seen them): neither is anywhere in PostgreSQL or Redis; the registry holds the
    keyed hash of the current one, which is not the token's plain SHA-256."""
    device = register("hashed")
    url = f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats"
    assert httpx.post(url, json={"msg_id": "first"}, headers=device.auth).status_code == 202
    assert connect(apps, device).accepted
    rotated = api.post(f"/api/v1/devices/{device.device_id}/token")
    assert rotated.status_code == 200, rotated.text
    current = Device(device.device_id, rotated.json()["token"])
    assert httpx.post(url, json={"msg_id": "second"}, headers=current.auth).status_code == 202
    assert connect(apps, current).accepted
    stale = httpx.post(url, json={"msg_id": "stale"}, headers=device.auth)
    assert stale.status_code == 401 and device.token not in stale.text  # never echoed
    poll(lambda: len(history(api, device.device_id)) == 2, what="both heartbeats stored")
    assert holding(engine, redis_client, [device.token, current.token]) == []
    with engine.connect() as conn:
        stored = conn.scalar(
            text("SELECT token_hash FROM devices WHERE device_id = :d"), {"d": device.device_id}
        )
    assert stored == token_hash(current.token)
    assert stored != hashlib.sha256(current.token.encode()).hexdigest()


def test_a_login_compares_keyed_hashes_in_constant_time(engine, register, monkeypatch) -> None:
    """An MQTT login's check (`registry.authenticate`): the keyed hash of the token given is
    compared with the stored one by `hmac.compare_digest`, for a right token, a wrong one and
    an unknown device alike; the token itself is never compared."""
    device = register("login")
    compared: list[tuple] = []
    real = hmac.compare_digest
    monkeypatch.setattr(
        "gateway.contract.credentials.hmac.compare_digest",
        lambda a, b: compared.append((a, b)) or real(a, b),
    )
    with engine.connect() as conn:
        verdicts = [
            registry.authenticate(conn, device.device_id, device.token),
            registry.authenticate(conn, device.device_id, device.token + "x"),
            registry.authenticate(conn, unique("nobody"), device.token),
        ]
    assert verdicts == [
        registry.Verdict.OK,
        registry.Verdict.BAD_TOKEN,
        registry.Verdict.UNKNOWN_DEVICE,
    ]
    assert len(compared) == 3
    assert compared[0] == (token_hash(device.token), token_hash(device.token))
    assert all(len(a) == len(b) == 64 and device.token not in a + b for a, b in compared)


# ---- settings -----------------------------------------------------------------------------------


STRONG = "k3J9-rT2vQ8xZ1mW5pL7"


@pytest.mark.parametrize(
    "url",
    [
        "amqp://127.0.0.1:5673/%2F",
        "amqp://gateway:gateway@127.0.0.1:5673/%2F",
        "amqp://gateway-bridge:gateway-bridge@rabbitmq:5672/%2F",
        "amqp://gateway-bridge:short@rabbitmq:5672/%2F",
    ],
)
def test_production_refuses_a_weak_broker_password(url: str) -> None:
    with pytest.raises(ValueError, match="GATEWAY_AMQP_URL"):
        BridgeSettings(
            environment="production",
            amqp_url=url,
            database_url=f"postgresql+psycopg2://gateway:{STRONG}@db/gateway",
            redis_url=f"redis://:{STRONG}@redis:6379/0",
        )


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("database_url", "postgresql+psycopg2://gateway:gateway@db/gateway", "DATABASE_URL"),
        ("database_url", "postgresql+psycopg2://gateway@db/gateway", "DATABASE_URL"),
        ("redis_url", "redis://redis:6379/0", "REDIS_URL"),
        ("broker_management_url", "http://gateway:guest@rabbitmq:15672", "MANAGEMENT_URL"),
        ("broker_management_url", None, "MANAGEMENT_URL"),
        ("operator_token", "x" * 32, "OPERATOR_TOKEN"),
    ],
)
def test_production_refuses_weak_secrets_of_any_kind(field: str, value, variable: str) -> None:
    strong = {
        "environment": "production",
        "amqp_url": f"amqp://gateway-api:{STRONG}@rabbitmq:5672/%2F",
        "database_url": f"postgresql+psycopg2://gateway:{STRONG}@db/gateway",
        "redis_url": f"redis://:{STRONG}@redis:6379/0",
        "broker_management_url": f"http://gateway:{STRONG}@rabbitmq:15672",
        "operator_token": STRONG,
    }
    ApiSettings(**strong)
    with pytest.raises(ValueError, match=variable):
        ApiSettings(**{**strong, field: value})


def test_the_broker_refuses_a_message_too_big_and_the_rest_flow(
    apps: LocalStack, api: httpx.Client, register
) -> None:
    """Over the broker's limit: refused (no PUBACK), nothing stored. Over a heartbeat's 16 KiB
    but under the limit: a dead letter, its first 64 KiB kept. Another device never notices."""
    a, b = register("big"), register("small")
    session = connect(apps, a)
    try:
        assert not session.publish(f"devices/{a.device_id}/heartbeat", b" " * 300_000)
    finally:
        session.close()
    session = connect(apps, a)
    try:
        assert session.publish(f"devices/{a.device_id}/heartbeat", b" " * 70_000)
    finally:
        session.close()
    dead = poll(lambda: rejected(api, a.device_id, "too_large"), what="the too_large dead letter")
    assert [(d["size"], len(d["payload"])) for d in dead] == [(70_000, 64 * 1024)]
    assert [h["msg_id"] for h in beat_and_wait(apps, api, b, 1)] == ["marker-1"]
    assert history(api, a.device_id) == []
