"""Hostile input over both transports: each refused with a clear, specific reason.

Payloads: oversized, deeply nested, not UTF-8, duplicate keys, huge numbers. Device ids: dots,
wildcards, `..`, unicode, 10 KB. Over MQTT a bad payload becomes a dead letter with its reason
(and the flow goes on); a bad device id cannot even log in. Over HTTP each gets a 4xx whose
detail names the problem.
"""

from __future__ import annotations

import urllib.parse

import httpx
import pytest
from hostile import RawMqtt
from support import Device, history, mqtt_session, poll, publish_acked

from gateway.devtools.localstack import LocalStack

pytestmark = pytest.mark.e2e

PAYLOADS = {
    "oversized": (b'{"x": "' + b"y" * 20_000 + b'"}', "too_large", 413, "limit"),
    "deeply nested": (b'{"m": ' * 200 + b"1" + b"}" * 200, "too_deep", 422, "nested"),
    "not UTF-8": (b'{"name": "\xff\xfe\xfa"}', "not_utf8", 415, "UTF-8"),
    "duplicate keys": (b'{"cpu": 1, "cpu": 2}', "duplicate_key", 422, "'cpu'"),
    "huge float": (b'{"cpu": 1e400}', "non_finite_number", 422, "finite"),
    "huge integer": (b'{"count": 1' + b"0" * 40 + b"}", "invalid_field", 422, "64-bit"),
    "NaN": (b'{"cpu": NaN}', "non_finite_number", 422, "NaN"),
    "lone surrogate": (b'{"name": "\\ud800"}', "not_utf8", 415, "surrogate"),
    "600 deep": (b'{"m": ' + b"[" * 600 + b"1" + b"]" * 600 + b"}", "too_deep", 422, "nested"),
}

BAD_IDS = {
    "dots": "a.b",
    "plus wildcard": "a+b",
    "hash wildcard": "a#b",
    "dot dot": "..",
    "unicode": "sénsor-ü",
    "10 KB": "x" * 10_240,
    "slash": "a/b",
}


def test_bad_payloads_over_mqtt_are_dead_letters_with_their_reason(
    apps: LocalStack, api, device: Device
) -> None:
    topic = f"devices/{device.device_id}/heartbeat"
    with mqtt_session(apps.ports.mqtt, device) as client:
        for body, *_ in PAYLOADS.values():
            assert publish_acked(client, topic, body)
        assert publish_acked(client, topic, b'{"msg_id": "after"}')

    def dead_letters() -> list[dict]:
        items = api.get(
            "/api/v1/rejected", params={"device_id": device.device_id, "limit": 100}
        ).json()["items"]
        return items if len(items) == len(PAYLOADS) else []

    dead = poll(dead_letters, what=f"{len(PAYLOADS)} dead letters")
    got = sorted((d["reason"], d["size"]) for d in dead)
    assert got == sorted((reason, len(body)) for body, reason, *_ in PAYLOADS.values())
    for d in dead:
        assert d["detail"] and d["topic"] == f"devices/{device.device_id}/heartbeat"
    stored = poll(
        lambda: history(api, device.device_id),
        what="the good heartbeat after them",
    )
    assert [h["msg_id"] for h in stored] == ["after"]


@pytest.mark.parametrize("case", list(PAYLOADS))
def test_bad_payloads_over_http_get_a_specific_4xx(apps: LocalStack, device: Device, case: str):
    body, _, status, words = PAYLOADS[case]
    response = httpx.post(
        f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats",
        content=body,
        headers={**device.auth, "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_device_ids_over_http(apps: LocalStack, device: Device, case: str) -> None:
    quoted = urllib.parse.quote(BAD_IDS[case], safe="")
    response = httpx.post(
        f"{apps.api_url}/api/v1/devices/{quoted}/heartbeats", json={}, headers=device.auth
    )
    if case in ("slash", "dot dot"):  # path syntax, not a device id: no route takes it
        assert response.status_code == 404
        return
    assert response.status_code == 422, response.text
    assert "device id" in response.json()["detail"]
    assert "1-64 characters" in response.json()["detail"]


#: CONNACK with return code 4, "bad user name or password" (MQTT 3.1.1, 3.2.2.3).
REFUSED = b"\x20\x02\x00\x04"


@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_device_ids_cannot_log_in_over_mqtt(apps: LocalStack, device: Device, case: str):
    """On a bare socket, since paho refuses to send some of these: a CONNECT with a real
    device's token and the bad id as user name (and as client id, or with the device's own),
    or the device's own user name with the bad id as client id. The broker refuses each
    (CONNACK 4) and takes nothing on that connection; the same CONNECT with the device's own
    id is accepted, so the refusal is the id's."""
    own = RawMqtt(apps.ports.mqtt, device.device_id, device.token)
    assert own.connected, own.connack
    own.close()
    bad = BAD_IDS[case]
    for username, client_id in ((bad, bad), (bad, device.device_id), (device.device_id, bad)):
        attempt = RawMqtt(apps.ports.mqtt, username, device.token, client_id=client_id)
        try:
            assert attempt.connack == REFUSED, (case, username[:20], client_id[:20])
            topic = f"devices/{device.device_id}/heartbeat".encode()
            assert not attempt.publish(topic, b'{"msg_id": "through-a-refused-login"}')
        finally:
            attempt.close()


def test_a_device_cannot_publish_to_a_topic_with_a_bad_device_id(
    apps: LocalStack, device: Device
) -> None:
    with mqtt_session(apps.ports.mqtt, device) as client:
        assert not publish_acked(client, "devices/a.b/heartbeat", b"{}")
