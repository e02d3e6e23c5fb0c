"""Simulated devices: realistic heartbeats over MQTT (QoS 1) or HTTP, with an exact tally.

Each device has its own registered credentials and sends `{"msg_id", "seq", "ts", metrics}` on
its interval (with jitter); metrics drift like a real device's. The tally records every
heartbeat sent and every one the gateway acknowledged (PUBACK or 202), so a run can be checked
against what PostgreSQL stored. Used by `gateway simulate`, the fault tests and the benchmarks.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import orjson
import paho.mqtt.client as mqtt


@dataclass(frozen=True)
class Credentials:
    device_id: str
    token: str


@dataclass
class Tally:
    """What was sent and what the gateway acknowledged, by msg_id (thread-safe)."""

    sent: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    refused: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_sent(self, msg_id: str) -> None:
        with self._lock:
            self.sent[msg_id] = time.time()

    def record_acked(self, msg_id: str, at: float | None = None) -> None:
        with self._lock:
            self.acked[msg_id] = time.time() if at is None else at

    def record_refused(self) -> None:
        with self._lock:
            self.refused += 1

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1


class Sensor:
    """Metrics that drift like a real device's, and a payload builder."""

    def __init__(self, device_id: str, rng: random.Random) -> None:
        self.device_id = device_id
        self.boot = uuid.uuid4().hex[:8]
        self.seq = 0
        self._rng = rng
        self._cpu = rng.uniform(5, 40)
        self._mem = rng.uniform(30, 70)
        self._temp = rng.uniform(35, 55)

    def next_payload(self) -> tuple[str, bytes]:
        r = self._rng
        self._cpu = min(100.0, max(0.0, self._cpu + r.gauss(0, 3)))
        self._mem = min(100.0, max(0.0, self._mem + r.gauss(0, 0.5)))
        self._temp += r.gauss(0, 0.2) + (45 - self._temp) * 0.01
        msg_id = f"{self.device_id}-{self.boot}-{self.seq}"
        body = {
            "msg_id": msg_id,
            "seq": self.seq,
            "ts": round(time.time(), 3),
            "cpu": round(self._cpu, 1),
            "mem": round(self._mem, 1),
            "temp_c": round(self._temp, 2),
            "rssi": -50 - int(abs(r.gauss(0, 10))),
        }
        self.seq += 1
        return msg_id, orjson.dumps(body)


class MqttDevice:
    """One MQTT connection per device; reconnects by itself; QoS 1."""

    def __init__(
        self,
        creds: Credentials,
        host: str,
        port: int,
        tally: Tally,
        *,
        will: bool = False,
        rng: random.Random,
    ) -> None:
        self.creds = creds
        self.tally = tally
        self.sensor = Sensor(creds.device_id, rng)
        self._pending: list[tuple[mqtt.MQTTMessageInfo, str]] = []
        #: When each PUBACK arrived, by message id, until `settle` moves it to the tally.
        self._puback_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=creds.device_id,
            protocol=mqtt.MQTTv311,
        )
        self.client.username_pw_set(creds.device_id, creds.token)
        self.client.reconnect_delay_set(0.2, 2.0)
        self.client.max_queued_messages_set(0)  # queue while disconnected, send on reconnect
        self.client.max_inflight_messages_set(100)
        if will:
            self.client.will_set(f"devices/{creds.device_id}/status", "offline", qos=1)
        self.client.on_publish = self._on_puback
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_puback(self, client, userdata, mid, reason_code, properties) -> None:
        # paho calls this before the message's info says published, so `settle` finds it.
        self._puback_at[mid] = time.time()

    def send(self) -> None:
        msg_id, body = self.sensor.next_payload()
        self.tally.record_sent(msg_id)
        info = self.client.publish(f"devices/{self.creds.device_id}/heartbeat", body, qos=1)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            info.rc = mqtt.MQTT_ERR_SUCCESS  # kept by paho and sent once reconnected
        with self._lock:
            self._pending.append((info, msg_id))

    def settle(self) -> int:
        """Move acknowledged publishes to the tally, with the time their PUBACK arrived;
        returns how many are still pending."""
        with self._lock:
            pending, self._pending = self._pending, []
        still = []
        for info, msg_id in pending:
            if info.is_published():
                self.tally.record_acked(msg_id, self._puback_at.pop(info.mid, None))
            else:
                still.append((info, msg_id))
        with self._lock:
            self._pending[:0] = still
            return len(self._pending)

    def close(self, *, clean: bool = True) -> None:
        if clean:
            self.client.disconnect()
        self.client.loop_stop()


class HttpDevice:
    """A device that can only POST; one request at a time, like a real one."""

    def __init__(self, creds: Credentials, api_url: str, tally: Tally, *, rng: random.Random):
        self.creds = creds
        self.tally = tally
        self.sensor = Sensor(creds.device_id, rng)
        self.url = f"{api_url}/api/v1/devices/{creds.device_id}/heartbeats"
        self.client = httpx.Client(
            timeout=10,
            headers={
                "Authorization": f"Bearer {creds.token}",
                "Content-Type": "application/json",
            },
        )

    def send(self) -> None:
        msg_id, body = self.sensor.next_payload()
        self.tally.record_sent(msg_id)
        try:
            response = self.client.post(self.url, content=body)
        except httpx.HTTPError:
            self.tally.record_error()
            return
        if response.status_code == 202:
            self.tally.record_acked(msg_id)
        else:
            self.tally.record_refused()

    def settle(self) -> int:
        return 0

    def close(self, *, clean: bool = True) -> None:
        self.client.close()


@dataclass
class Simulation:
    """Devices sending on their interval until stopped or `duration` is over."""

    devices: list[Credentials]
    interval_s: float
    transport: str = "mqtt"
    host: str = "127.0.0.1"
    mqtt_port: int = 1884
    api_url: str = "http://127.0.0.1:8000"
    jitter: float = 0.1
    will: bool = False
    seed: int = 0
    tally: Tally = field(default_factory=Tally)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Simulation:
        rng = random.Random(self.seed)
        if self.transport == "mqtt":
            self._clients = [
                MqttDevice(c, self.host, self.mqtt_port, self.tally, will=self.will, rng=rng)
                for c in self.devices
            ]
        else:
            self._clients = [HttpDevice(c, self.api_url, self.tally, rng=rng) for c in self.devices]
        self._thread = threading.Thread(target=self._run, name="simulation", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(self.seed + 1)
        # HTTP devices block on their request: a pool sends for them, each device in turn.
        pool = ThreadPoolExecutor(min(32, len(self._clients))) if self.transport == "http" else None
        due = [time.monotonic() + rng.uniform(0, self.interval_s) for _ in self._clients]
        busy: set[int] = set()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                index = min(range(len(due)), key=due.__getitem__)
                if due[index] > now:
                    self._stop.wait(min(due[index] - now, 0.05))
                    continue
                spread = self.interval_s * self.jitter
                due[index] = max(due[index] + self.interval_s + rng.uniform(-spread, spread), now)
                if pool is None:
                    self._clients[index].send()
                elif index not in busy:  # a slow request delays that device, like a real one
                    busy.add(index)
                    pool.submit(self._send_http, index, busy)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _send_http(self, index: int, busy: set[int]) -> None:
        try:
            self._clients[index].send()
        finally:
            busy.discard(index)

    def settle(self) -> int:
        return sum(client.settle() for client in self._clients)

    def stop(self, *, settle_s: float = 10.0, clean: bool = True) -> Tally:
        """Stop sending, wait (up to `settle_s`) for outstanding acknowledgements, close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + settle_s
        while self.settle() and time.monotonic() < deadline:
            time.sleep(0.05)
        for client in self._clients:
            client.close(clean=clean)
        self.settle()
        return self.tally

    def run_for(
        self, seconds: float, progress: Callable[[Tally, float], None] | None = None
    ) -> Tally:
        started = time.monotonic()
        self.start()
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(min(1.0, seconds - elapsed))
            self.settle()
            if progress is not None:
                progress(self.tally, time.monotonic() - started)
        return self.stop()


def percentiles(
    values: Iterable[float], points: Iterable[float] = (50, 95, 99)
) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {f"p{int(p)}": math.nan for p in points}
    return {
        f"p{int(p)}": ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]
        for p in points
    }
