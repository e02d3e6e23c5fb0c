"""Tokens never cross a network in clear: devices reach the real local stack over MQTT with TLS
(mosquitto_pub --cafile, paho), MQTT over WebSocket with TLS (paho) and HTTPS (curl --cacert),
each heartbeat is found stored; a client that does not trust the stack's CA, or speaks plain text
to a TLS port, gets nowhere. The production profile (GATEWAY_ENVIRONMENT=production) opens no
plain listener for devices, checked on a real broker and a real api process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from support import Device, history, poll, unavailable

from gateway.devtools.localstack import WEB_MQTT_PATH, LocalStack, port_open

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ca(apps: LocalStack) -> Path:
    """The CA the test stack's TLS listeners are certified by (made by the stack)."""
    files = apps.tls_files()
    assert files.ca is not None and files.ca.is_file(), files
    return files.ca


def need(command: str, package: str) -> None:
    if shutil.which(command) is None:
        unavailable(f"{command} is missing (apt-get install {package})")


def mosquitto_pub(
    port: int, device: Device, message: str, *tls: str
) -> subprocess.CompletedProcess:
    """The README's command line, over TLS when `tls` gives the options (`--cafile ...`)."""
    need("mosquitto_pub", "mosquitto-clients")
    d = device.device_id
    where = ["-h", "127.0.0.1", "-p", str(port), "-q", "1"]
    who = ["-i", d, "-u", d, "-P", device.token]
    return subprocess.run(
        ["mosquitto_pub", *tls, *where, *who, "-t", f"devices/{d}/heartbeat", "-m", message],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def curl_heartbeat(url: str, device: Device, body: str, *tls: str) -> subprocess.CompletedProcess:
    """POST a heartbeat with curl; stdout is the HTTP status."""
    need("curl", "curl")
    headers = [
        "-H",
        f"Authorization: Bearer {device.token}",
        "-H",
        "Content-Type: application/json",
    ]
    target = f"{url}/api/v1/devices/{device.device_id}/heartbeats"
    return subprocess.run(
        [
            "curl",
            "-sS",
            *tls,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            *headers,
            "--data",
            body,
            target,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@contextlib.contextmanager
def paho_client(device: Device, *, websocket: bool = False) -> Iterator[mqtt.Client]:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=device.device_id,
        protocol=mqtt.MQTTv311,
        transport="websockets" if websocket else "tcp",
    )
    if websocket:
        client.ws_set_options(path=WEB_MQTT_PATH)
    client.username_pw_set(device.device_id, device.token)
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def paho_publish(client: mqtt.Client, port: int, device: Device, body: bytes) -> None:
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    info = client.publish(f"devices/{device.device_id}/heartbeat", body, qos=1)
    info.wait_for_publish(timeout=10)
    assert info.is_published(), "no PUBACK from the broker"


def stored_seqs(api: httpx.Client, device: Device, count: int) -> list[int]:
    rows = poll(
        lambda: len(history(api, device.device_id)) >= count and history(api, device.device_id),
        what=f"{count} stored heartbeat(s) of {device.device_id}",
    )
    return sorted(row["seq"] for row in rows)


# ---- each transport stores the heartbeat ----------------------------------------------------


def test_mosquitto_pub_over_tls(apps: LocalStack, api: httpx.Client, register, ca: Path) -> None:
    device = register("tls")
    result = mosquitto_pub(
        apps.ports.mqtt_tls, device, '{"seq": 1, "cpu": 3.5}', "--cafile", str(ca)
    )
    assert result.returncode == 0, result.stderr
    (row,) = poll(lambda: history(api, device.device_id), what="the heartbeat")
    assert (row["seq"], row["source"], row["metrics"]) == (1, "mqtt", {"cpu": 3.5})


def test_paho_over_tls(apps: LocalStack, api: httpx.Client, register, ca: Path) -> None:
    device = register("tls")
    with paho_client(device) as client:
        client.tls_set(ca_certs=str(ca))
        paho_publish(client, apps.ports.mqtt_tls, device, b'{"seq": 2}')
    assert stored_seqs(api, device, 1) == [2]


def test_paho_over_websocket_with_tls(
    apps: LocalStack, api: httpx.Client, register, ca: Path
) -> None:
    device = register("wss")
    with paho_client(device, websocket=True) as client:
        client.tls_set(ca_certs=str(ca))
        paho_publish(client, apps.ports.web_mqtt_tls, device, b'{"seq": 3}')
    (row,) = poll(lambda: history(api, device.device_id), what="the heartbeat")
    assert (row["seq"], row["source"]) == (3, "mqtt")


def test_curl_over_https(apps: LocalStack, api: httpx.Client, register, ca: Path) -> None:
    device = register("https")
    result = curl_heartbeat(apps.api_https_url, device, '{"seq": 4}', "--cacert", str(ca))
    assert (result.returncode, result.stdout) == (0, "202"), result.stderr
    (row,) = poll(lambda: history(api, device.device_id), what="the heartbeat")
    assert (row["seq"], row["source"]) == (4, "http")


def test_operator_reads_over_https(apps: LocalStack, api: httpx.Client, register, ca: Path) -> None:
    device = register("https")
    with httpx.Client(
        base_url=apps.api_https_url, verify=ssl.create_default_context(cafile=ca)
    ) as c:
        response = c.get(f"/api/v1/devices/{device.device_id}", headers=api.headers)
        assert response.status_code == 200, response.text
        assert response.json()["device_id"] == device.device_id
        # The endpoints RabbitMQ calls live on the internal listener only, never on HTTPS.
        form = {"username": device.device_id, "password": device.token}
        assert c.post("/internal/rabbitmq/user", data=form).status_code == 404


# ---- who gets nowhere -----------------------------------------------------------------------


def test_a_client_that_does_not_trust_the_ca_is_refused(
    apps: LocalStack, api: httpx.Client, register, ca: Path
) -> None:
    """Clients that trust only the system's CAs (as a device that was never given ca.pem)
    refuse the stack's certificate: the handshake fails before any credential is sent."""
    device = register("untrusting")
    system = ("--capath", "/etc/ssl/certs")
    refused = mosquitto_pub(apps.ports.mqtt_tls, device, '{"seq": 1}', *system)
    assert refused.returncode != 0, "mosquitto_pub accepted a certificate it does not trust"
    curl = curl_heartbeat(apps.api_https_url, device, '{"seq": 2}')
    assert curl.returncode == 60, f"curl: {curl.returncode} {curl.stderr}"  # peer certificate
    for websocket, port in ((False, apps.ports.mqtt_tls), (True, apps.ports.web_mqtt_tls)):
        with paho_client(device, websocket=websocket) as client:
            client.tls_set()  # the system's CAs
            with pytest.raises(ssl.SSLCertVerificationError):
                client.connect("127.0.0.1", port, keepalive=30)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{apps.api_https_url}/healthz")
    # A marker down a trusted path: once it is stored, none of the refused ones can follow.
    marker = mosquitto_pub(apps.ports.mqtt_tls, device, '{"seq": 9}', "--cafile", str(ca))
    assert marker.returncode == 0, marker.stderr
    assert stored_seqs(api, device, 1) == [9]


def test_plain_text_on_a_tls_port_fails(
    apps: LocalStack, api: httpx.Client, register, ca: Path
) -> None:
    device = register("plain")
    refused = mosquitto_pub(apps.ports.mqtt_tls, device, '{"seq": 1}')
    assert refused.returncode != 0, "plain MQTT was accepted on the MQTT over TLS port"
    with paho_client(device, websocket=True) as client:
        with contextlib.suppress(OSError, ValueError):  # refused at connect, or no CONNACK
            paho_publish(client, apps.ports.web_mqtt_tls, device, b'{"seq": 2}')
        assert not client.is_connected(), "plain WebSocket MQTT was accepted on the TLS port"
    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"http://127.0.0.1:{apps.ports.api_tls}/api/v1/devices/{device.device_id}/heartbeats",
            json={"seq": 3},
            headers=device.auth,
        )
    marker = curl_heartbeat(apps.api_https_url, device, '{"seq": 9}', "--cacert", str(ca))
    assert marker.stdout == "202", marker.stderr
    assert stored_seqs(api, device, 1) == [9]


def test_plain_mqtt_over_websocket_is_never_opened(apps: LocalStack) -> None:
    listeners = apps.management("GET", "/api/overview")["listeners"]  # type: ignore[index]
    protocols = {listener["protocol"] for listener in listeners}
    assert {"mqtt/ssl", "https/web-mqtt"} <= protocols, protocols
    assert "http/web-mqtt" not in protocols, "a plain MQTT over WebSocket listener is open"


# ---- the production profile -----------------------------------------------------------------


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its sockets, matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_production_api_serves_devices_over_https_only(
    apps: LocalStack, api: httpx.Client, register, ca: Path
) -> None:
    """A real api process with the production profile's settings (as the local stack gives
    them): it listens on HTTPS and on the internal listener, and on nothing else."""
    ports = dataclasses.replace(
        apps.ports, api_internal=apps.ports.api_internal + 50, api_tls=apps.ports.api_tls + 50
    )
    production = dataclasses.replace(
        apps, ports=ports, app_env={"GATEWAY_ENVIRONMENT": "production"}
    )
    env = production.env("api")
    assert env["GATEWAY_API_PORT"] == "0"
    executable = Path(sys.executable).parent / "gateway-api"
    log = apps.log_dir / "api-production.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(executable)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        verify = ssl.create_default_context(cafile=ca)

        def ready() -> bool:
            assert process.poll() is None, f"the api exited; see {log}"
            try:
                return httpx.get(
                    f"https://127.0.0.1:{ports.api_tls}/readyz", verify=verify
                ).is_success
            except httpx.TransportError:
                return False

        poll(ready, timeout=30, what="the production api's HTTPS /readyz")
        assert listening_ports(process.pid) == {ports.api_tls, ports.api_internal}
        device = register("prod")
        response = httpx.post(
            f"https://127.0.0.1:{ports.api_tls}/api/v1/devices/{device.device_id}/heartbeats",
            json={"seq": 1},
            headers=device.auth,
            verify=verify,
        )
        assert response.status_code == 202, response.text
        assert stored_seqs(api, device, 1) == [1]
    finally:
        process.terminate()
        assert process.wait(30) == 0, f"the api did not stop cleanly; see {log}"


@pytest.mark.slow
def test_production_broker_opens_no_plain_mqtt_listener(apps: LocalStack) -> None:
    """A RabbitMQ node of its own with the production profile's configuration (ports of its
    own): it starts, serves MQTT over TLS and over WebSocket with TLS, and has no plain MQTT
    listener."""
    ports = dataclasses.replace(
        apps.ports,
        **{name: getattr(apps.ports, name) + 50 for name in ("amqp", "mqtt", "management")},
        **{name: getattr(apps.ports, name) + 50 for name in ("prometheus", "dist")},
        **{name: getattr(apps.ports, name) + 50 for name in ("mqtt_tls", "web_mqtt_tls")},
    )
    broker = LocalStack(
        "tls-only", ports, root=apps.root, app_env={"GATEWAY_ENVIRONMENT": "production"}
    )
    broker.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        broker.start_rabbitmq()
        broker.wait_rabbitmq()
        listeners = broker.management("GET", "/api/overview")["listeners"]  # type: ignore[index]
        by_protocol = {listener["protocol"]: listener["port"] for listener in listeners}
        assert by_protocol.get("mqtt/ssl") == ports.mqtt_tls
        assert by_protocol.get("https/web-mqtt") == ports.web_mqtt_tls
        assert "mqtt" not in by_protocol and "http/web-mqtt" not in by_protocol, by_protocol
        assert not port_open(ports.mqtt)
    finally:
        broker.stop_rabbitmq()
