"""HTTP ingest answers 202 only once the broker has confirmed the heartbeat, and 503 (with
Retry-After) when it cannot get that confirm. A real api process talks to the stack's real
RabbitMQ through a TCP proxy of the test's, which cuts the connection (the broker is away) or
holds the broker's answers (its confirm is late); the stack's worker stores what the broker
took, so PostgreSQL tells what was stored.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from proxy import TcpProxy
from sqlalchemy import Engine, select
from support import Device, poll

from gateway.devtools.localstack import LocalStack
from gateway.storage.schema import heartbeats

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APP = "api-2"


@pytest.fixture
def proxied_api(apps: LocalStack) -> Iterator[Callable[[float], tuple[str, TcpProxy]]]:
    """Start an api process whose broker connection goes through a proxy; yields its URL and
    the proxy. Stopped afterwards."""
    proxies: list[TcpProxy] = []

    def start(confirm_timeout_s: float, **settings: str) -> tuple[str, TcpProxy]:
        proxy = TcpProxy(apps.ports.amqp)
        proxies.append(proxy)
        amqp = urllib.parse.urlsplit(apps.env("api")["GATEWAY_AMQP_URL"])
        via_proxy = amqp._replace(netloc=f"{amqp.netloc.rsplit(':', 1)[0]}:{proxy.port}")
        port = apps.health_port(APP)
        env = apps.env("api") | {
            "GATEWAY_AMQP_URL": urllib.parse.urlunsplit(via_proxy),
            "GATEWAY_API_PORT": str(port),
            "GATEWAY_API_INTERNAL_PORT": str(port + 1),
            "GATEWAY_API_TLS_PORT": "0",
            "GATEWAY_API_CONFIRM_TIMEOUT_S": str(confirm_timeout_s),
            **{f"GATEWAY_{name.upper()}": value for name, value in settings.items()},
        }
        apps.start_app(APP, env=env)
        apps.wait_apps((APP,))
        assert proxy.accepted >= 1, "the api did not connect through the proxy"
        return f"http://127.0.0.1:{port}", proxy

    yield start
    apps.stop_app(APP)
    for proxy in proxies:
        proxy.close()


def send(url: str, device: Device, msg_id: str) -> httpx.Response:
    return httpx.post(
        f"{url}/api/v1/devices/{device.device_id}/heartbeats",
        json={"msg_id": msg_id, "cpu": 1.5},
        headers=device.auth,
        timeout=60,
    )


def stored(engine: Engine, device: Device) -> dict[str, list[str]]:
    """The device's stored heartbeats: ids by msg_id (a list, to see a copy)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(heartbeats.c.msg_id, heartbeats.c.id).where(
                heartbeats.c.device_id == device.device_id
            )
        ).all()
    found: dict[str, list[str]] = {}
    for msg_id, id_ in rows:
        found.setdefault(msg_id, []).append(str(id_))
    return found


def ready_status(url: str) -> int:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_503_with_retry_after_and_nothing_stored_while_the_broker_is_away(
    proxied_api, register, engine: Engine
) -> None:
    device: Device = register()  # before the api starts: known to it from the start
    url, proxy = proxied_api(5.0)
    assert send(url, device, "before").status_code == 202
    proxy.cut()  # every byte between the api and the broker stops here
    refused = []
    for i in range(3):
        response = send(url, device, f"away-{i}")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "did not confirm" in response.json()["detail"]
        refused.append(f"away-{i}")
    poll(lambda: ready_status(url) == 503, what="/readyz 503 while the broker is away")

    proxy.restore()
    attempts = iter(range(1000))

    def accepted() -> tuple[str, httpx.Response] | None:
        msg_id = f"back-{next(attempts)}"
        response = send(url, device, msg_id)
        if response.status_code == 503:  # still reconnecting: refused, so never stored
            refused.append(msg_id)
            return None
        assert response.status_code == 202, response.text
        return msg_id, response

    back, response = poll(accepted, timeout=60, what="a 202 once the broker is back")
    rows = poll(
        lambda: back in (s := stored(engine, device)) and s,
        what="the heartbeat sent once the broker was back",
    )
    # Stored once the broker was back, after everything sent before it: none of the refused.
    assert rows[back] == [response.json()["id"]]
    assert set(rows) == {"before", back}, f"stored though refused: {set(rows) & set(refused)}"
    assert ready_status(url) == 200


def test_a_202_comes_only_after_the_brokers_confirm(proxied_api, register, engine: Engine) -> None:
    """The broker's answers are held: the heartbeat reaches the queue and the worker stores it,
    yet the device has no answer until the confirm gets through."""
    device: Device = register()  # before the api starts: known to it from the start
    url, proxy = proxied_api(60.0)
    assert send(url, device, "warm").status_code == 202
    proxy.hold()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(send, url, device, "held")
        try:
            rows = poll(
                lambda: "held" in (s := stored(engine, device)) and s,
                timeout=30,
                what="the held heartbeat stored",
            )
            assert not answer.done(), f"answered before the confirm: {answer.result().text}"
        finally:
            proxy.release()
        response = answer.result(timeout=60)
    assert response.status_code == 202, response.text
    assert response.json()["id"] == rows["held"][0]


def test_a_confirm_too_late_is_a_503_and_the_retry_is_stored_once(
    proxied_api, register, engine: Engine
) -> None:
    """The broker took the heartbeat but its confirm came after the api gave up: the device got
    a 503, not a 202 (nothing unstored is ever acknowledged); its retry, with the same msg_id,
    gets a 202 with the same id, and the heartbeat is stored once."""
    device: Device = register()  # before the api starts: known to it from the start
    url, proxy = proxied_api(2.0)
    assert send(url, device, "warm").status_code == 202
    proxy.hold()
    try:
        late = send(url, device, "late")
        assert late.status_code == 503, late.text
        assert late.headers["retry-after"] == "1"
        rows = poll(
            lambda: "late" in (s := stored(engine, device)) and s,
            what="the heartbeat the broker took",
        )
    finally:
        proxy.release()
    retry = poll(
        lambda: (r := send(url, device, "late")).status_code == 202 and r,
        what="the retry accepted",
    )
    assert retry.json()["id"] == rows["late"][0]
    assert send(url, device, "after").status_code == 202
    rows = poll(lambda: "after" in (s := stored(engine, device)) and s, what="the marker")
    assert rows["late"] == [retry.json()["id"]]


def test_heartbeats_sent_together_share_one_work_message_and_its_confirm(
    proxied_api, register, engine: Engine
) -> None:
    """Ten devices post at once: the api sends their heartbeats as one work message (one
    `basic.publish` on the wire), and answers none of them before that message's confirm."""
    devices = [register() for _ in range(10)]
    url, proxy = proxied_api(60.0, api_linger_ms="1000")
    assert send(url, devices[0], "warm").status_code == 202
    before = proxy.published
    proxy.hold()
    with ThreadPoolExecutor(len(devices)) as pool:
        answers = [pool.submit(send, url, d, "together") for d in devices]
        try:
            poll(
                lambda: all("together" in stored(engine, d) for d in devices),
                timeout=30,
                what="the ten heartbeats stored",
            )
            assert not any(a.done() for a in answers), "answered before the confirm"
        finally:
            proxy.release()
        responses = [a.result(timeout=60) for a in answers]
    assert [r.status_code for r in responses] == [202] * len(devices)
    assert proxy.published - before == 1
