"""`kill -9` of the bridge, the worker or the api with commands in flight: none is lost, and a
device that drops repeats by id runs none twice.

MQTT devices stay connected (their sessions are the broker's), execute each command id once,
and reply to every copy they get. The killed service dies holding work: the bridge and the
worker are frozen first while replies queue up for them (they die with deliveries unacked);
the api dies while operators send commands and its dispatcher publishes them. Every command
an operator got a 202 for ends `succeeded`, with exactly one execution on its device.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter

import httpx
import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import Engine, select
from support import Device, poll
from test_faults import healthy, kill9, restart_app  # noqa: F401 (a fixture)

from gateway.storage.schema import commands

pytestmark = [pytest.mark.e2e, pytest.mark.fault, pytest.mark.slow]


class Executor:
    """A device that runs each command once (by id) and replies to every copy."""

    def __init__(self, port: int, device: Device) -> None:
        self.device = device
        self.ran: Counter[str] = Counter()
        self.copies: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(device.device_id, device.token)
        self.client.on_connect = lambda c, *a: c.subscribe(
            f"devices/{device.device_id}/commands", qos=1
        )
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        command_id = json.loads(message.payload)["id"]
        with self._lock:
            self.copies[command_id] += 1
            if command_id not in self.ran:  # a repeat is dropped, not run again
                self.ran[command_id] += 1
        body = json.dumps({"id": command_id, "status": "succeeded", "result": {}})
        client.publish(f"devices/{self.device.device_id}/replies", body, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def send_commands(apps, devices: list[Device], rounds: int, accepted: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {os.environ['GATEWAY_OPERATOR_TOKEN']}"}
    for n in range(rounds):
        for device in devices:
            try:
                response = httpx.post(
                    f"{apps.api_url}/api/v1/devices/{device.device_id}/commands",
                    json={"name": "step", "args": {"n": n}, "ttl_s": 300},
                    headers=headers,
                    timeout=5,
                )
            except httpx.HTTPError:
                continue  # the api is down: this one was never accepted
            if response.status_code == 202:
                accepted[response.json()["id"]] = device.device_id


@pytest.mark.parametrize("name", ["bridge", "worker", "api"])
def test_kill_9_with_commands_in_flight(healthy, engine: Engine, register, name: str) -> None:  # noqa: F811
    devices = [register("cmdfault") for _ in range(3)]
    executors = [Executor(healthy.ports.mqtt, d) for d in devices]
    accepted: dict[str, str] = {}
    try:
        send_commands(healthy, devices, 3, accepted)
        if name == "api":
            sender = threading.Thread(target=send_commands, args=(healthy, devices, 10, accepted))
            sender.start()
            time.sleep(0.3)
            kill9(healthy, name)
            sender.join(60)
        else:
            pid = healthy.component(name).pid()
            os.kill(pid, signal.SIGSTOP)  # replies wait for it, unacked once it resumes
            try:
                send_commands(healthy, devices, 5, accepted)
                time.sleep(1)
                kill9(healthy, name)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        restart_app(healthy, name)
        send_commands(healthy, devices, 2, accepted)

        def statuses() -> Counter[str]:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(commands.c.status).where(commands.c.id.in_(list(accepted)))
                ).all()
            return Counter(r[0] for r in rows)

        poll(
            lambda: statuses() == Counter({"succeeded": len(accepted)}),
            timeout=60,
            what=f"all {len(accepted)} accepted commands succeeded",
        )
    finally:
        for executor in executors:
            executor.close()
    ran = Counter()
    for executor in executors:
        ran.update(executor.ran)
        assert {i for i, d in accepted.items() if d == executor.device.device_id} <= set(
            executor.ran
        ), "an accepted command never reached its device"
    assert set(ran.values()) == {1}, "a command ran twice"
    assert len(accepted) >= 3 * len(devices)
