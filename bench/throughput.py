"""Throughput and latency of the gateway, against ceilings measured in the same run.

On a stack of its own (loopback only), in this order:
  (a) broker alone: MQTT QoS 1 publishes into the inbox, taken by an AMQP consumer that only
      acks, in a process of its own (`bench/inbox_consumer.py`);
  MQTT end to end: heartbeats committed to PostgreSQL, then paced at 50% and 90% of that rate;
  the same two the old way (the consumer in the load generator's process, devices offering
    2,000/s, counted from their start to their stop), so both methods' ratios come from the
    same run;
  (b) PostgreSQL alone: COPY of heartbeat rows;
  (c) uvicorn alone: a handler that answers 202 and does nothing, with 128 and 32 connections,
      with the same wrk script as the api (and with the old static one);
  worker alone: a backlog of canonical messages drained into PostgreSQL;
  HTTP end to end: `POST /heartbeats` (202 after the broker's confirm) with wrk: one api
    process with 128 connections, then paced at 50% and 90% of that rate with the same 128,
    then 32 connections, and two api processes with 128;
  soak: five minutes of MQTT at 50% of the sustained rate, the worker's memory sampled.

How it counts (the method, and what changed, is in docs/performance.md):
  - Every run has marks: its window opens `warm` seconds after the load starts and closes while
    the load still goes on. A rate is what happened between the marks: heartbeats committed
    (PostgreSQL's commit time), messages the ceiling's consumer took, 202s wrk received,
    PUBACKs the devices received. A ceiling and its end-to-end run are counted the same way.
  - MQTT devices publish as fast as the path behind them takes: they are steered to keep about
    BACKLOG heartbeats sent and not yet through it (taken by the ceiling's consumer, committed
    by the worker), so the path never waits for work and no backlog grows without end. HTTP
    clients are bound by their connections: each sends once answered.
  - Every heartbeat, MQTT or HTTP, carries its msg_id; every acknowledged one (PUBACK, or the
    id in a 202) is looked for in PostgreSQL: `lost` lists the acknowledged but not stored.
  - Latencies are from the client's send: to the PUBACK or the 202 (what a device waits) and
    to the commit (end to end); the server's own share, receive to commit, is given beside.
  - The old method's figures come from the same run, next to the new ones.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import io
import json
import math
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import psycopg2
from sqlalchemy import func, literal_column, select

from gateway.amqp import accounts, topology
from gateway.amqp.publisher import Publisher
from gateway.contract.messages import MESSAGE_NAMESPACE, Heartbeat, Source, WorkBatch
from gateway.contract.payload import HeartbeatPayload
from gateway.devtools.localstack import LocalStack, StackError, port_open, require_system_packages
from gateway.devtools.simulate import Credentials, Simulation, Tally, percentiles
from gateway.runtime.settings import BridgeSettings
from gateway.storage import registry
from gateway.storage.engine import make_engine
from gateway.storage.schema import heartbeats

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LUA = BENCH / "heartbeats.lua"
CONSUMER = BENCH / "inbox_consumer.py"
COMMITTED_AT = literal_column("pg_xact_commit_timestamp(heartbeats.xmin)")
MQTT_DEVICES = 100
#: Steering (see `Steering`): the rate devices start at, the most they may offer, how often
#: the rate is set, and the heartbeats it keeps sent and not yet through the path.
START_PER_S = 1000.0
MAX_OFFERED_PER_S = 8000.0
STEER_EVERY_S = 0.2
BACKLOG = 1000
#: What the old method's devices offered (one heartbeat per device every 50 ms): less than the
#: broker alone takes once its consumer has a process of its own.
OLD_OFFERED_PER_S = 2000.0
WARM_UP_INTERVAL_S = 1.0
BARE_PORT = 8299
CONNECTIONS = 128
FEW_CONNECTIONS = 32
WRK_THREADS = 2


@dataclass(frozen=True)
class Durations:
    """Seconds of each run: its load starts, `warm` later the window opens, `window` later it
    closes, and the load goes on `tail` more (so the window ends under load)."""

    warm: float = 5
    window: float = 15
    tail: float = 1
    http_warm: int = 2
    http_window: int = 10
    soak: float = 300
    drain_messages: int = 50_000
    copy_rows: int = 200_000

    @classmethod
    def quick(cls) -> Durations:
        """For trying the bench out: every figure, none of them steady."""
        return cls(
            warm=3, window=5, http_warm=1, http_window=4, soak=20, drain_messages=10_000,
            copy_rows=50_000,
        )  # fmt: skip


def say(text: str) -> None:
    print(text, flush=True)


# ---- counting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marks:
    """A run's measured window, by the wall clock (PostgreSQL's commit times are wall-clock
    times too), on a 0.1 s grid so that counts kept per 10 or 100 ms fall wholly in or out."""

    start: float
    end: float

    @classmethod
    def after(cls, started: float, warm: float, window: float) -> Marks:
        start = math.ceil((started + warm) * 10) / 10
        return cls(start, start + window)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end

    def rate(self, times: Iterable[float]) -> float:
        """Events per second between the marks."""
        return sum(1 for t in times if self.holds(t)) / self.seconds

    def bucket_rate(self, buckets: Mapping[int, int], per_s: int) -> float:
        """The same, from counts per 1/`per_s` of a second (keyed by whole 1/`per_s` since
        the epoch)."""
        first, last = round(self.start * per_s), round(self.end * per_s)
        return sum(n for at, n in buckets.items() if first <= at < last) / self.seconds


def in_ms(latencies: Iterable[float]) -> dict[str, float]:
    """p50, p95 and p99 of latencies in seconds, in milliseconds."""
    return {k: round(v * 1000, 1) for k, v in percentiles(latencies).items()}


def register(stack: LocalStack, prefix: str, count: int) -> list[Credentials]:
    engine = make_engine(stack.database_url)
    with engine.begin() as conn:
        creds = []
        for i in range(count):
            issued, _ = registry.register(
                conn, registry.Registration(device_id=f"{prefix}-{i:04d}", heartbeat_interval_s=60)
            )
            creds.append(Credentials(issued.device_id, issued.token))
    engine.dispose()
    return creds


def stored(stack: LocalStack, device_ids: list[str]) -> list[Any]:
    """The devices' stored heartbeats: id, msg_id, device_ts, received_at and `committed`
    (the bench stack's PostgreSQL tracks commit timestamps)."""
    engine = make_engine(stack.database_url)
    c = heartbeats.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                c.id, c.msg_id, c.device_ts, c.received_at, COMMITTED_AT.label("committed")
            ).where(c.device_id.in_(device_ids))
        ).all()
    engine.dispose()
    return rows


def wait_drained(stack: LocalStack, device_ids: list[str], expected: int, timeout: float = 300):
    engine = make_engine(stack.database_url)
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            count = conn.scalar(
                select(func.count())
                .select_from(heartbeats)
                .where(heartbeats.c.device_id.in_(device_ids))
            )
        if count >= expected:
            break
        time.sleep(0.5)
    engine.dispose()
    return count


# ---- MQTT load --------------------------------------------------------------------------------


@dataclass
class MqttLoad:
    """What a run of MQTT devices sent and got back (PUBACK times included), and its marks."""

    tally: Tally
    started: float
    marks: Marks
    #: When the devices had stopped and their last PUBACKs were in (or given up on).
    returned: float
    #: CPU seconds the load generator (this process) used meanwhile.
    cpu_s: float
    #: When steered, every STEER_EVERY_S: (time, heartbeats sent and not yet through the
    #: path, the rate the devices were then asked for).
    steering: list[tuple[float, int, float]] = dataclasses.field(default_factory=list)

    def offered_per_s(self) -> float:
        return self.marks.rate(self.tally.sent.values())

    def generator_cpu_share(self) -> float:
        """Cores the devices kept busy: near 1, Python's lock bounds them, not the broker."""
        return round(self.cpu_s / (self.returned - self.started), 2)

    def steered(self) -> dict[str, Any]:
        """The backlog's range between the marks (above 0: the path never waited for work),
        and the rate asked of the devices (above what they sent: they could not send more,
        and the rate is the load generator's)."""
        inside = [(n, rate) for at, n, rate in self.steering if self.marks.holds(at)]
        if not inside:
            return {}
        backlogs = [n for n, _ in inside]
        return {
            "backlog_min": min(backlogs),
            "backlog_max": max(backlogs),
            "asked_per_s": round(statistics.mean(rate for _, rate in inside)),
        }


class Steering:
    """Holds the devices' rate at what the path behind them takes, for as long as they publish.

    `through()` counts heartbeats that came out of the path (taken by the ceiling's consumer,
    committed by the worker); sent and not yet through is the backlog. Every STEER_EVERY_S the
    devices are set to offer what came through over the last second, plus what brings the
    backlog back to BACKLOG within a second. So the path always has work waiting (its rate is
    its own, not the devices'), and no backlog grows without end (whose intake would take the
    machine's CPU from the path itself)."""

    def __init__(self, sim: Simulation, through: Callable[[], int], rate: float) -> None:
        self.sim = sim
        self.through = through
        self.rate = rate
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steering", daemon=True)

    def __enter__(self) -> Steering:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        base = self.through()
        seen = collections.deque([(time.monotonic(), base)])
        while not self._stop.wait(STEER_EVERY_S):
            now, done = time.monotonic(), self.through()
            seen.append((now, done))
            while now - seen[0][0] > 1.0:
                seen.popleft()
            backlog = len(self.sim.tally.sent) - (done - base)
            then, done_then = seen[0]
            if now - then >= 0.5:
                drained = (done - done_then) / (now - then)
                rate = drained + (BACKLOG - backlog) / 1.0
                self.rate = min(max(rate, MQTT_DEVICES / 10), MAX_OFFERED_PER_S)
                self.sim.interval_s = len(self.sim.devices) / self.rate
            self.samples.append((time.time(), backlog, self.rate))


def drive(
    stack: LocalStack,
    creds: list[Credentials],
    rate: float,
    seconds: float,
    progress: Callable[[Tally, float], None] | None = None,
    through: Callable[[], int] | None = None,
) -> tuple[Tally, list[tuple[float, int, float]]]:
    """MQTT devices publishing for `seconds` at `rate` heartbeats per second; with `through`,
    `rate` is where they start and a `Steering` moves it (its samples are returned)."""
    sim = Simulation(creds, interval_s=len(creds) / rate, mqtt_port=stack.ports.mqtt, jitter=0.05)
    if through is None:
        return sim.run_for(seconds, progress), []
    with Steering(sim, through, rate) as steering:
        tally = sim.run_for(seconds, progress)
    return tally, steering.samples


def timed_drive(
    stack: LocalStack,
    creds: list[Credentials],
    rate: float,
    durations: Durations,
    window: float | None = None,
    progress: Callable[[Tally, float], None] | None = None,
    through: Callable[[], int] | None = None,
) -> MqttLoad:
    window = durations.window if window is None else window
    started, cpu = time.time(), time.process_time()
    marks = Marks.after(started, durations.warm, window)
    seconds = durations.warm + window + durations.tail
    tally, steering = drive(stack, creds, rate, seconds, progress, through)
    return MqttLoad(tally, started, marks, time.time(), time.process_time() - cpu, steering)


def mqtt_figures(load: MqttLoad, rows: list[Any]) -> dict:
    """Rates between the marks, loss by msg_id, and the latencies of the heartbeats sent
    between the marks: publish to PUBACK, publish to commit, and the bridge's receive to
    commit."""
    sent, acked, marks = load.tally.sent, load.tally.acked, load.marks
    mine = {r.msg_id: r for r in rows if r.msg_id in sent}
    measured = [m for m, at in sent.items() if marks.holds(at)]
    return {
        "offered_per_s": round(load.offered_per_s()),
        "puback_per_s": round(marks.rate(acked.values())),
        "committed_per_s": round(marks.rate(r.committed.timestamp() for r in mine.values())),
        "published": len(sent),
        "acknowledged": len(acked),
        "stored": len(mine),
        "lost": sorted(set(acked) - set(mine)),
        "generator_cpu_share": load.generator_cpu_share(),
        **({"steered": load.steered()} if load.steering else {}),
        "latency_ms": {
            "publish_to_puback": in_ms(acked[m] - sent[m] for m in measured if m in acked),
            "publish_to_commit": in_ms(
                mine[m].committed.timestamp() - sent[m] for m in measured if m in mine
            ),
            "received_to_commit": in_ms(
                (mine[m].committed - mine[m].received_at).total_seconds()
                for m in measured
                if m in mine
            ),
        },
    }


# ---- ceilings ---------------------------------------------------------------------------------


class InboxConsumer:
    """`bench/inbox_consumer.py` in a process of its own: how many messages it took so far
    (`through`, for `Steering`), and, once closed, how many per 10 ms."""

    def __init__(self, stack: LocalStack) -> None:
        self.consumed = 0
        self.process = subprocess.Popen(
            [sys.executable, str(CONSUMER), topology.MQTT_INBOX_QUEUE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "BENCH_AMQP_URL": stack.amqp_url_for(accounts.BRIDGE)},
        )
        with selectors.DefaultSelector() as waiting:
            waiting.register(self.process.stdout, selectors.EVENT_READ)
            ready = waiting.select(timeout=60)
        if not ready or self.process.stdout.readline().strip() != "consuming":
            self.process.kill()
            self.process.wait()
            raise StackError("the ceiling's consumer did not start")
        self._last = ""
        self._reader = threading.Thread(target=self._read, name="consumer-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("consumed "):
                self.consumed = int(line.split()[1])
            else:
                self._last = line

    def through(self) -> int:
        return self.consumed

    def close(self) -> dict[int, int]:
        """Stop it (its standard input closes) and return its deliveries per 10 ms."""
        self.process.stdin.close()
        try:
            self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        return {int(k): n for k, n in json.loads(self._last)["buckets"].items()}


def broker_ceiling(stack: LocalStack, creds: list[Credentials], durations: Durations) -> dict:
    """MQTT QoS 1 into the inbox, taken and acked by `bench/inbox_consumer.py` in a process of
    its own, the devices steered by what it took, counted between the marks like the
    end-to-end run. `consumed_per_s_old_window` counts the same deliveries the old way (from
    the devices' start to their stop)."""
    stack.stop_app("bridge")
    consumer = InboxConsumer(stack)
    try:
        load = timed_drive(stack, creds, START_PER_S, durations, through=consumer.through)
        consumer_cpu_s = cpu_seconds(consumer.process.pid)
    finally:
        buckets = consumer.close()
    stack.purge(topology.MQTT_INBOX_QUEUE)  # what a ceiling's consumer did not take
    stack.start_app("bridge")
    stack.wait_apps(("bridge",))
    old_window = Marks(load.started, load.returned)
    return {
        "offered_per_s": round(load.offered_per_s()),
        "consumed_per_s": round(load.marks.bucket_rate(buckets, 100)),
        "puback_per_s": round(load.marks.rate(load.tally.acked.values())),
        "steered": load.steered(),
        "consumed_per_s_old_window": round(old_window.bucket_rate(buckets, 100)),
        # Well below one core each, neither the consumer nor the devices bounded the rate.
        "consumer_cpu_share": round(consumer_cpu_s / (load.returned - load.started), 2),
        "generator_cpu_share": load.generator_cpu_share(),
    }


def broker_ceiling_old(stack: LocalStack, creds: list[Credentials], seconds: float) -> dict:
    """The old method, kept to show what changed: devices offering OLD_OFFERED_PER_S, the
    consumer in the load generator's own process (an aio-pika task beside the devices'
    threads), counted from the devices' start to their stop, PUBACKs over the nominal
    seconds."""
    stack.stop_app("bridge")
    acked = 0

    async def consume(stop: asyncio.Event, consuming: asyncio.Event) -> None:
        nonlocal acked
        async with await aio_pika.connect(stack.amqp_url_for(accounts.BRIDGE)) as conn:
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.get_queue(topology.MQTT_INBOX_QUEUE)

            async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal acked
                await message.ack()
                acked += 1

            await queue.consume(on)
            consuming.set()
            await stop.wait()

    async def run() -> tuple[float, float]:
        stop, consuming = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(consume(stop, consuming))
        await asyncio.wait_for(consuming.wait(), 30)
        started, before = time.monotonic(), acked
        tally, _ = await asyncio.to_thread(drive, stack, creds, OLD_OFFERED_PER_S, seconds)
        elapsed = time.monotonic() - started
        rate = (acked - before) / elapsed
        stop.set()
        await task
        return rate, len(tally.acked) / seconds

    consumed, published = asyncio.run(run())
    stack.purge(topology.MQTT_INBOX_QUEUE)  # what a ceiling's consumer did not take
    stack.start_app("bridge")
    stack.wait_apps(("bridge",))
    return {"consumed_per_s": round(consumed), "puback_per_s": round(published)}


def postgres_ceiling(stack: LocalStack, rows: int) -> dict:
    """COPY of heartbeat-shaped rows into a table exactly like `heartbeats` (same indexes,
    logged, committed): what PostgreSQL itself can take on this machine."""
    buffer = io.StringIO()
    now = datetime.now(UTC).isoformat()
    today = datetime.now(UTC).date()
    for i in range(rows):
        buffer.write(
            f"{uuid.uuid4()}\t{today}\tceiling-{i % 100}\tm-{i}\t{i}\t{now}\t{now}\tmqtt\t"
            '{"cpu": 12.5, "mem": 61.0, "temp_c": 48.2, "rssi": -60}\n'
        )
    dsn = stack.database_url.replace("postgresql+psycopg2", "postgresql")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS copy_ceiling")
        cur.execute("CREATE TABLE copy_ceiling (LIKE heartbeats INCLUDING ALL)")
        conn.commit()
        buffer.seek(0)
        started = time.perf_counter()
        cur.copy_expert(
            "COPY copy_ceiling (id, stored_on, device_id, msg_id, seq, device_ts, received_at,"
            " source, metrics) FROM STDIN",
            buffer,
        )
        conn.commit()
        elapsed = time.perf_counter() - started
        cur.execute("DROP TABLE copy_ceiling")
    return {"rows": rows, "rows_per_s": round(rows / elapsed)}


# ---- wrk --------------------------------------------------------------------------------------


@dataclass
class WrkRun:
    """What `bench/heartbeats.lua` wrote down: per thread how many requests it sent, the
    statuses, the 202s per 100 ms, the ids the 202s named; wrk's latency percentiles (from
    its send to the complete answer)."""

    started: float
    marks: Marks
    requests_per_s: float
    sent: list[int]
    statuses: dict[int, int]
    buckets: dict[int, int]
    acked_ids: list[str]
    latency_ms: dict[str, float]
    errors: int

    def accepted_per_s(self) -> float:
        return self.marks.bucket_rate(self.buckets, 10)


def wrk(
    url: str,
    token: str,
    run: str,
    connections: int,
    durations: Durations,
    rate: float | None = None,
) -> WrkRun:
    """wrk with `bench/heartbeats.lua` for http_warm + http_window + 1 seconds; paced to
    `rate` requests per second when given."""
    seconds = durations.http_warm + durations.http_window + 1
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as folder:
        out = Path(folder) / "out"
        env = {
            **os.environ,
            "BENCH_TOKEN": token,
            "BENCH_RUN": run,
            "BENCH_OUT": str(out),
            "BENCH_THREADS": str(WRK_THREADS),
            "BENCH_RATE": f"{rate:.3f}" if rate else "0",
        }
        started = time.time()
        done = subprocess.run(
            ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "-s", str(LUA), url],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=seconds + 60,
        )
        lines = out.read_text().splitlines()
    sent, statuses, buckets, acked, latency, errors = [], collections.Counter(), {}, [], {}, 0
    for line in lines:
        kind, *values = line.split()
        if kind == "sent":
            sent.append(int(values[0]))
        elif kind == "status":
            statuses[int(values[0])] += int(values[1])
        elif kind == "bucket":
            buckets[int(values[0])] = buckets.get(int(values[0]), 0) + int(values[1])
        elif kind == "ack":
            acked.append(values[0])
        elif kind == "latency":
            latency[f"p{values[0]}"] = round(int(values[1]) / 1000, 1)
        elif kind == "errors":
            errors = int(values[0])
    return WrkRun(
        started=started,
        marks=Marks.after(started, durations.http_warm, durations.http_window),
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1)),
        sent=sent,
        statuses=dict(statuses),
        buckets=buckets,
        acked_ids=acked,
        latency_ms=latency,
        errors=errors,
    )


def wrk_static(url: str, token: str, connections: int, seconds: int = 10) -> dict:
    """The old method's wrk: one static body (no msg_id), counted by wrk's own totals (from
    its first request to its last)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-static-") as script:
        script.write(
            'wrk.method = "POST"\n'
            'wrk.body = \'{"cpu": 12.5, "mem": 61.0, "temp_c": 48.2}\'\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {token}"\n'
        )
        script.flush()
        done = subprocess.run(
            [
                "wrk",
                "-t2",
                "--latency",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        )
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
    return {"connections": connections, "requests_per_s": round(rate)}


def uvicorn_ceiling(token: str, connections: int, durations: Durations) -> dict:
    """Bare uvicorn (`bench/bare_app.py`) under the same wrk script as the api, its 202s counted
    between the marks; and under the old method's static wrk."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_app:app",
            "--port",
            str(BARE_PORT),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=BENCH.parent,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open(BARE_PORT):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackError("bare uvicorn did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{BARE_PORT}/api/v1/devices/bare/heartbeats"
        wrk_static(url, token, connections, seconds=3)  # a new process is slower at first
        run = wrk(url, token, "bare", connections, durations)
        old = wrk_static(url, token, connections)
    finally:
        process.terminate()
        process.wait(10)
    return {
        "connections": connections,
        "accepted_per_s": round(run.accepted_per_s()),
        "latency_ms": run.latency_ms,
        "old_method_requests_per_s": old["requests_per_s"],
    }


# ---- end to end -------------------------------------------------------------------------------


def mqtt_run(
    stack: LocalStack,
    prefix: str,
    rate: float,
    durations: Durations,
    window: float | None = None,
    progress: Callable[[Tally, float], None] | None = None,
    through: Callable[[], int] | None = None,
) -> tuple[dict, list[Any], MqttLoad]:
    """Newly registered devices publishing over MQTT (at `rate`, or steered by `through` from
    there); once the worker drained them, the run's figures (`mqtt_figures`), its stored rows
    and its load.

    Each device first connects and sends about two heartbeats, outside the measure: a device's
    first connect and first heartbeat cost more (its state row, the broker's permission cache),
    and `bench/auth_connect.py` measures those."""
    creds = register(stack, f"{prefix}-{int(time.time())}", MQTT_DEVICES)
    ids = [c.device_id for c in creds]
    warm, _ = drive(stack, creds, MQTT_DEVICES / WARM_UP_INTERVAL_S, 2 * WARM_UP_INTERVAL_S)
    wait_drained(stack, ids, len(warm.acked))
    load = timed_drive(stack, creds, rate, durations, window, progress, through)
    wait_drained(stack, ids, len(warm.acked) + len(load.tally.acked))
    rows = stored(stack, ids)
    return mqtt_figures(load, rows), rows, load


def old_sustained(rows: list[Any], load: MqttLoad) -> float:
    """The old method's sustained rate: commits from the first until the devices' stop (after
    their last PUBACKs), over that span."""
    sent = load.tally.sent
    commits = sorted(
        t for r in rows if r.msg_id in sent and (t := r.committed.timestamp()) <= load.returned
    )
    return len(commits) / (load.returned - commits[0]) if commits else 0.0


def persisted(stack: LocalStack) -> Callable[[], int]:
    """The worker's count of heartbeats committed (its /metrics), for `Steering`."""
    url = f"http://127.0.0.1:{stack.health_port('worker')}/metrics"

    def through() -> int:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        return int(
            float(re.search(r"^gateway_heartbeats_persisted_messages_total (\S+)$", text, re.M)[1])
        )

    return through


def mqtt_end_to_end(stack: LocalStack, durations: Durations) -> dict:
    """Devices steered by what the worker commits, counted between the marks; then paced at
    50% and 90% of what was committed."""
    say("  MQTT: steered by the worker's commits")
    result, _, _ = mqtt_run(stack, "bench", START_PER_S, durations, through=persisted(stack))
    sustained = result["committed_per_s"]
    for share in (0.5, 0.9):
        say(f"  MQTT: {share:.0%} of sustained ({sustained * share:.0f}/s)")
        paced, _, _ = mqtt_run(stack, f"lat{int(share * 100)}", sustained * share, durations)
        result[f"at_{int(share * 100)}pct"] = {"target_per_s": round(sustained * share), **paced}
    return result


def mqtt_end_to_end_old(stack: LocalStack, seconds: float) -> dict:
    """The old method: devices offering OLD_OFFERED_PER_S for `seconds`, the rate counted by
    `old_sustained`."""
    say(f"  MQTT, the old way: {OLD_OFFERED_PER_S:.0f}/s offered for {seconds:.0f} s")
    whole = Durations(warm=0, window=seconds, tail=0)
    result, rows, load = mqtt_run(stack, "old", OLD_OFFERED_PER_S, whole)
    return {
        "sustained_per_s": round(old_sustained(rows, load)),
        "rate_per_s": round(len(load.tally.acked) / seconds),
        "lost": result["lost"],
    }


def worker_drain(stack: LocalStack, messages: int) -> dict:
    """A backlog on the work queue, drained by the worker alone."""
    stack.stop_app("worker")
    device = f"drain-{int(time.time())}"

    async def fill() -> None:
        """As the bridge forwards under load: work messages of `bridge_batch_size` heartbeats."""
        per = BridgeSettings().bridge_batch_size
        async with await aio_pika.connect(stack.amqp_url_for(accounts.BRIDGE)) as conn:
            publisher = await Publisher.open(conn, timeout=30)
            payload = HeartbeatPayload(metrics={"cpu": 12.5, "mem": 61.0})
            beats = [
                Heartbeat.from_payload(
                    device, payload.model_copy(update={"msg_id": f"d-{i}"}), Source.MQTT
                )
                for i in range(messages)
            ]
            batches = [WorkBatch(items=beats[i : i + per]) for i in range(0, messages, per)]
            for i in range(0, len(batches), 50):
                await asyncio.gather(*(publisher.publish_work(b) for b in batches[i : i + 50]))

    asyncio.run(fill())
    stack.start_app("worker")
    count = wait_drained(stack, [device], messages)
    # From the first commit to the last: the worker's own rate, not its start-up.
    commits = sorted(r.committed.timestamp() for r in stored(stack, [device]))
    span = commits[-1] - commits[0]
    return {"messages": messages, "stored": count, "rows_per_s": round(count / span)}


def first_heartbeat(url: str, token: str, timeout: float = 30) -> None:
    """One heartbeat before the measure, as MQTT devices send theirs: the api learns a new
    device's token from PostgreSQL's NOTIFY, and refuses it until then (a few milliseconds,
    longer when the api is busy)."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        answer = httpx.post(url, json={"msg_id": "first"}, headers=headers, timeout=10)
        if answer.status_code == 202:
            return
        if time.monotonic() > deadline:
            raise StackError(f"the api refused a new device's heartbeat: {answer.status_code}")
        time.sleep(0.05)


def http_run(
    stack: LocalStack,
    durations: Durations,
    connections: int = CONNECTIONS,
    rate: float | None = None,
) -> dict:
    """wrk posting numbered heartbeats for one new device (paced to `rate` when given); once
    the worker drained them: rates between the marks, every acknowledged id looked for among
    the stored rows, and the latencies of the heartbeats sent between the marks."""
    (cred,) = register(stack, f"http-{time.time_ns()}", 1)
    url = f"{stack.api_url}/api/v1/devices/{cred.device_id}/heartbeats"
    first_heartbeat(url, cred.token)
    run = wrk(url, cred.token, "h", connections, durations, rate)
    acked = set(run.acked_ids)
    count = wait_drained(stack, [cred.device_id], len(acked) + 1) - 1
    rows = [r for r in stored(stack, [cred.device_id]) if r.msg_id != "first"]
    # The ids each sent msg_id must have, so that a lost one is named by its msg_id.
    expected = {
        str(uuid.uuid5(MESSAGE_NAMESPACE, f"{cred.device_id}/h-{t}-{n}")): f"h-{t}-{n}"
        for t, count_sent in enumerate(run.sent)
        for n in range(1, count_sent + 1)
    }
    stored_ids = {str(r.id) for r in rows}
    marks = run.marks
    measured = [r for r in rows if r.device_ts is not None and marks.holds(r.device_ts.timestamp())]
    commits = [r.committed.timestamp() for r in rows]
    return {
        "connections": connections,
        **({"target_per_s": round(rate)} if rate else {}),
        "accepted_per_s": round(run.accepted_per_s()),
        "committed_per_s": round(marks.rate(commits)),
        "sent": sum(run.sent),
        "statuses": run.statuses,
        "socket_errors": run.errors,
        "acknowledged": len(run.acked_ids),
        "stored": len(rows),
        "lost": sorted(expected.get(i, i) for i in acked - stored_ids),
        "acknowledged_not_sent": len(acked - expected.keys()),
        "stored_unacknowledged": len(stored_ids - acked),
        "latency_ms": {
            "send_to_202": run.latency_ms,
            "send_to_commit": in_ms(
                r.committed.timestamp() - r.device_ts.timestamp() for r in measured
            ),
            "received_to_commit": in_ms(
                (r.committed - r.received_at).total_seconds() for r in measured
            ),
        },
        # The old method on the same run: wrk's rate, and stored until the last commit.
        "old_method": {
            "requests_per_s": round(run.requests_per_s),
            "stored_per_s": round(count / (max(commits) - run.started)) if commits else 0,
            "stored_at_least_accepted": count >= len(run.acked_ids),
        },
    }


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def soak(stack: LocalStack, rate: float, durations: Durations) -> dict:
    """MQTT at `rate` for `durations.soak` seconds: the worker's memory over time, and latency
    throughout."""
    pid = stack.component("worker").pid()
    samples: list[tuple[float, float]] = []
    last_line = 0.0

    def sample(tally: Tally, elapsed: float) -> None:
        nonlocal last_line
        samples.append((elapsed, rss_mb(pid)))
        if elapsed - last_line >= 30:
            last_line = elapsed
            say(
                f"  soak: {elapsed:3.0f} s, {len(tally.acked):,} acknowledged, "
                f"worker RSS {samples[-1][1]:.1f} MB"
            )

    summary, _, _ = mqtt_run(stack, "soak", rate, durations, durations.soak, sample)
    first_minute = max(rss for t, rss in samples if t <= 60)
    peak = max(rss for _, rss in samples)
    return {
        "seconds": durations.soak,
        "target_per_s": round(rate),
        **summary,
        "worker_rss_mb_first_minute_peak": round(first_minute, 1),
        "worker_rss_mb_peak": round(peak, 1),
        "worker_rss_mb_end": round(samples[-1][1], 1),
        "worker_rss_growth_pct": round((peak - first_minute) / first_minute * 100, 1),
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def process_usage(stack: LocalStack) -> dict:
    usage = {}
    for name in ("bridge", "worker", "api"):
        pid = stack.component(name).pid()
        if pid is None:
            continue
        status = Path(f"/proc/{pid}/status").read_text()
        peak = re.search(r"VmHWM:\s+(\d+) kB", status)
        usage[name] = {
            "cpu_s": round(cpu_seconds(pid), 1),
            "peak_rss_mb": round(int(peak.group(1)) / 1024, 1) if peak else None,
        }
    return usage


# ---- the run ----------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def ratios(results: dict) -> dict[str, dict[str, float | None]]:
    """Each ratio by the new method and by the old one, from the same run."""
    c, mqtt, drain = results["ceilings"], results["mqtt"], results["worker"]
    bare, bare_few = c["uvicorn"], c[f"uvicorn_{FEW_CONNECTIONS}_connections"]
    http, few, two = (
        results["http"],
        results[f"http_{FEW_CONNECTIONS}_connections"],
        results["http_two_api_processes"],
    )
    return {
        "mqtt_e2e_over_broker": {
            "new": ratio(mqtt["committed_per_s"], c["broker"]["consumed_per_s"]),
            "old": ratio(
                mqtt["old_method"]["sustained_per_s"], c["broker_old_method"]["consumed_per_s"]
            ),
        },
        "http_e2e_over_uvicorn": {
            "new": ratio(http["committed_per_s"], bare["accepted_per_s"]),
            "old": ratio(http["old_method"]["stored_per_s"], bare["old_method_requests_per_s"]),
        },
        f"http_e2e_over_uvicorn_{FEW_CONNECTIONS}_connections": {
            "new": ratio(few["committed_per_s"], bare_few["accepted_per_s"]),
            "old": ratio(few["old_method"]["stored_per_s"], bare_few["old_method_requests_per_s"]),
        },
        "http_e2e_two_api_processes_over_uvicorn": {
            "new": ratio(two["committed_per_s"], bare["accepted_per_s"]),
            "old": ratio(two["old_method"]["stored_per_s"], bare["old_method_requests_per_s"]),
        },
        # Measured as before: a drain from the first commit to the last, against COPY.
        "worker_over_copy": {
            "new": ratio(drain["rows_per_s"], c["postgres_copy"]["rows_per_s"]),
            "old": ratio(drain["rows_per_s"], c["postgres_copy"]["rows_per_s"]),
        },
    }


def p50_99(latency: dict[str, float]) -> str:
    return f"{latency['p50']}/{latency['p99']}"


def comparison(results: dict) -> str:
    """The old method's figures next to the new ones, as a terminal table."""
    c, mqtt, http = results["ceilings"], results["mqtt"], results["http"]
    rows = [
        ("MQTT end to end, /s", mqtt["old_method"]["sustained_per_s"], mqtt["committed_per_s"]),
        (
            "broker alone, /s",
            c["broker_old_method"]["consumed_per_s"],
            c["broker"]["consumed_per_s"],
        ),
        ("HTTP end to end (128), /s", http["old_method"]["stored_per_s"], http["committed_per_s"]),
        (
            "uvicorn alone (128), /s",
            c["uvicorn"]["old_method_requests_per_s"],
            c["uvicorn"]["accepted_per_s"],
        ),
        *((f"ratio {name}", r["old"], r["new"]) for name, r in results["ratios"].items()),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':<{width}}  {'old method':>10}  {'new method':>10}"]
    lines += [f"{name:<{width}}  {old!s:>10}  {new!s:>10}" for name, old, new in rows]
    for share in ("at_50pct", "at_90pct"):
        m, h = mqtt[share], http[share]
        ml, hl = m["latency_ms"], h["latency_ms"]
        lines += [
            f"MQTT {share}: target {m['target_per_s']}/s, reached {m['puback_per_s']}/s "
            f"(PUBACKs), {m['committed_per_s']}/s committed; p50/p99 ms: publish to PUBACK "
            f"{p50_99(ml['publish_to_puback'])}, to commit {p50_99(ml['publish_to_commit'])}, "
            f"received to commit {p50_99(ml['received_to_commit'])}",
            f"HTTP {share}: target {h['target_per_s']}/s, reached {h['accepted_per_s']}/s "
            f"(202s), {h['committed_per_s']}/s committed; p50/p99 ms: send to 202 "
            f"{p50_99(hl['send_to_202'])}, to commit {p50_99(hl['send_to_commit'])}, "
            f"received to commit {p50_99(hl['received_to_commit'])}",
        ]
    return "\n".join(lines)


def no_loss(results: dict) -> bool:
    """Every acknowledged heartbeat of every end-to-end run stored, by msg_id."""
    mqtt, http = results["mqtt"], results["http"]
    runs = [
        mqtt,
        mqtt["old_method"],
        mqtt["at_50pct"],
        mqtt["at_90pct"],
        results["soak"],
        http,
        http["at_50pct"],
        http["at_90pct"],
        results[f"http_{FEW_CONNECTIONS}_connections"],
        results["http_two_api_processes"],
    ]
    return all(not run["lost"] and not run.get("acknowledged_not_sent") for run in runs)


def measure(stack: LocalStack, durations: Durations) -> dict:
    ceiling_creds = register(stack, f"ceiling-{int(time.time())}", MQTT_DEVICES)
    say("(a) broker alone, the consumer in its own process")
    broker = broker_ceiling(stack, ceiling_creds, durations)
    say("MQTT end to end")
    mqtt = mqtt_end_to_end(stack, durations)
    say("(a) broker alone, the old way (the consumer in the load generator's process)")
    broker_old = broker_ceiling_old(stack, ceiling_creds, durations.window)
    mqtt["old_method"] = mqtt_end_to_end_old(stack, durations.window)
    say("(b) PostgreSQL alone (COPY)")
    postgres = postgres_ceiling(stack, durations.copy_rows)
    (http_cred,) = register(stack, f"bare-{int(time.time())}", 1)
    say(f"(c) uvicorn alone, {CONNECTIONS} and {FEW_CONNECTIONS} connections")
    bare = uvicorn_ceiling(http_cred.token, CONNECTIONS, durations)
    bare_few = uvicorn_ceiling(http_cred.token, FEW_CONNECTIONS, durations)
    say("worker alone (draining a backlog)")
    drain = worker_drain(stack, durations.drain_messages)
    say(f"HTTP end to end, {CONNECTIONS} connections")
    http = http_run(stack, durations)
    usage = process_usage(stack)
    for share in (0.5, 0.9):
        target = http["committed_per_s"] * share
        say(f"  HTTP: {share:.0%} of sustained ({target:.0f}/s), {CONNECTIONS} connections")
        http[f"at_{int(share * 100)}pct"] = http_run(stack, durations, rate=target)
    say(f"HTTP end to end, {FEW_CONNECTIONS} connections")
    http_few = http_run(stack, durations, FEW_CONNECTIONS)
    say("HTTP end to end, two api processes")
    stack.stop_app("api")
    stack.app_env["GATEWAY_API_WORKERS"] = "2"
    stack.start_app("api")
    stack.wait_apps(("api",))
    http_two = http_run(stack, durations)
    say(f"soak: MQTT at 50% of sustained for {durations.soak:.0f} s (worker memory)")
    soaked = soak(stack, mqtt["committed_per_s"] * 0.5, durations)
    return {
        "ceilings": {
            "broker": broker,
            "broker_old_method": broker_old,
            "postgres_copy": postgres,
            "uvicorn": bare,
            f"uvicorn_{FEW_CONNECTIONS}_connections": bare_few,
        },
        "mqtt": mqtt,
        "worker": drain,
        "http": http,
        f"http_{FEW_CONNECTIONS}_connections": http_few,
        "http_two_api_processes": http_two,
        "soak": soaked,
        "processes": usage,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short runs (minutes, not steady): to try it out"
    )
    parser.add_argument("--window", type=float, help="seconds of each MQTT run's window")
    parser.add_argument("--soak", type=float, help="seconds of the soak's window")
    parser.add_argument("--out", type=Path, help="the results file (default: bench/results/)")
    args = parser.parse_args()
    durations = Durations.quick() if args.quick else Durations()
    if args.window:
        durations = dataclasses.replace(durations, window=args.window)
    if args.soak:
        durations = dataclasses.replace(durations, soak=args.soak)
    require_system_packages({"wrk": "wrk"})
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-throughput.json"
    stack = LocalStack.bench()
    stack.down(echo=False)
    started = time.monotonic()
    try:
        stack.up(apps=False, echo=False)
        stack.empty()  # each run starts from nothing stored
        stack.up(echo=False)
        measured = measure(stack, durations)
    except (StackError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        say(f"bench failed: {exc}")
        return 1
    finally:
        stack.down(echo=False)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started),
        "durations": dataclasses.asdict(durations),
        **measured,
    }
    results["ratios"] = ratios(results)
    results["no_loss"] = no_loss(results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    say(json.dumps(results, indent=2))
    say(comparison(results))
    say(f"no loss (every acknowledged msg_id stored): {results['no_loss']}")
    say(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
