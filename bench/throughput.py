"""Throughput and latency of the gateway, against ceilings measured in the same run.

On a stack of its own (loopback only), in this order:
  (a) broker alone: MQTT QoS 1 publishes into the inbox, an AMQP consumer that only acks;
  (b) PostgreSQL alone: COPY of heartbeat rows;
  (c) uvicorn alone: a handler that answers 202 and does nothing, with 128 and 32 connections;
  MQTT end to end: the sustained rate of heartbeats committed to PostgreSQL while devices
    publish as fast as they can, then the publish-to-commit latency at 50% and 90% of it;
  worker alone: a backlog of canonical messages drained into PostgreSQL;
  HTTP end to end: `POST /heartbeats` (202 after the broker's confirm) with wrk: one api
    process with 128 connections, then paced at 50% and 90% of that rate (receive-to-commit
    latency), with 32 connections, and two api processes with 128;
  soak: five minutes of MQTT at 50% of the sustained rate, the worker's memory sampled.
It checks stored = acknowledged for every end-to-end run, and reports the ratios.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import psycopg2
from sqlalchemy import ColumnElement, func, literal_column, select

from gateway import accounts, registry, topology
from gateway.broker import Publisher
from gateway.db import make_engine
from gateway.localstack import LocalStack, StackError, port_open, require_system_packages
from gateway.messages import Heartbeat, Source, WorkBatch
from gateway.payload import HeartbeatPayload
from gateway.schema import heartbeats
from gateway.settings import BridgeSettings
from gateway.simulate import Credentials, Simulation, Tally, percentiles

RESULTS = Path(__file__).parent / "results"
COMMITTED_AT = literal_column("pg_xact_commit_timestamp(heartbeats.xmin)")
MQTT_DEVICES = 100
WINDOW_S = 15.0
SOAK_S = 300.0
WARM_UP_INTERVAL_S = 1.0
#: HTTP load: wrk, 2 threads, for 10 s (WINDOW_S when paced); with 128 connections (a fleet's
#: many clients) for the ratio, and with 32 too, where waiting for confirms bounds the rate.
WRK = ["wrk", "-t2", "--latency"]
CONNECTIONS = 128
FEW_CONNECTIONS = 32
BARE_PORT = 8299


def say(text: str) -> None:
    print(text, flush=True)


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


def drive(
    stack: LocalStack,
    creds: list[Credentials],
    rate: float | None,
    seconds: float,
    progress: Callable[[Tally, float], None] | None = None,
):
    """MQTT devices publishing for `seconds` (as fast as they can when `rate` is None)."""
    interval = 0.0005 * len(creds) if rate is None else len(creds) / rate
    sim = Simulation(creds, interval_s=interval, mqtt_port=stack.ports.mqtt, jitter=0.05)
    return sim.run_for(seconds, progress)


def stored(
    stack: LocalStack, device_ids: list[str], key: ColumnElement = heartbeats.c.msg_id
) -> list[tuple[Any, datetime]]:
    """(`key`, commit time) of the devices' stored heartbeats (the bench stack's PostgreSQL
    tracks commit timestamps)."""
    engine = make_engine(stack.database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(key, COMMITTED_AT).where(heartbeats.c.device_id.in_(device_ids))
        ).all()
    engine.dispose()
    return rows


def in_ms(latencies: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of latencies in seconds, in milliseconds."""
    return {k: round(v * 1000, 1) for k, v in percentiles(latencies).items()}


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


# ---- ceilings ---------------------------------------------------------------------------------


def broker_ceiling(stack: LocalStack, creds: list[Credentials]) -> dict:
    """MQTT QoS 1 into the inbox, an AMQP consumer that only acks: the broker's own rate."""
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
        tally = await asyncio.to_thread(drive, stack, creds, None, WINDOW_S)
        elapsed = time.monotonic() - started
        rate = (acked - before) / elapsed
        stop.set()
        await task
        return rate, len(tally.acked) / WINDOW_S

    consumed, published = asyncio.run(run())
    stack.start_app("bridge")
    stack.wait_apps(("bridge",))
    return {"consumed_per_s": round(consumed), "puback_per_s": round(published)}


def postgres_ceiling(stack: LocalStack, rows: int = 200_000) -> dict:
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


def wrk(url: str, script: Path, connections: int, seconds: float = 10) -> dict:
    done = subprocess.run(
        [*WRK, f"-c{connections}", f"-d{seconds:.0f}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non_2xx = int(bad.group(1)) if bad else 0
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {p: re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1) for p in ("50", "90", "99")}
    return {
        "connections": connections,
        "requests_per_s": round(rate),
        "requests": total,
        "non_2xx": non_2xx,
        "accepted": total - non_2xx,
        "socket_errors": errors.group(1) if errors else "",
        "latency": lat,
    }


def lua(token: str, delay_ms: int = 0) -> Path:
    """wrk's script: POST a heartbeat; with `delay_ms`, each connection waits that long before
    each request (how a paced run holds a rate)."""
    script = Path(RESULTS / ".post.lua")
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.body = \'{"cpu": 12.5, "mem": 61.0, "temp_c": 48.2}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
        + (f"function delay() return {delay_ms} end\n" if delay_ms else "")
    )
    return script


def uvicorn_ceiling(token: str, connections: int) -> dict:
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
        cwd=Path(__file__).parent.parent,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open(BARE_PORT):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackError("bare uvicorn did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{BARE_PORT}/api/v1/devices/bare/heartbeats"
        return wrk(url, lua(token), connections)
    finally:
        process.terminate()
        process.wait(10)


# ---- end to end -------------------------------------------------------------------------------


def mqtt_run(
    stack: LocalStack,
    prefix: str,
    rate: float | None,
    seconds: float,
    progress: Callable[[Tally, float], None] | None = None,
) -> tuple[dict, list[tuple[str, datetime]], float]:
    """Newly registered devices publishing over MQTT for `seconds`; once the worker drained
    them: what was acknowledged, stored and lost (acknowledged, not stored), the
    publish-to-commit latency, the stored rows, and when the devices stopped publishing.

    Each device first connects and sends about two heartbeats, outside the measure: a device's
    first connect and first heartbeat cost more (its state row, the broker's permission cache),
    and `bench/auth_connect.py` measures those."""
    creds = register(stack, f"{prefix}-{int(time.time())}", MQTT_DEVICES)
    ids = [c.device_id for c in creds]
    warm = drive(stack, creds, MQTT_DEVICES / WARM_UP_INTERVAL_S, 2 * WARM_UP_INTERVAL_S)
    wait_drained(stack, ids, len(warm.acked))
    tally = drive(stack, creds, rate, seconds, progress)
    published_until = time.time()
    wait_drained(stack, ids, len(warm.acked) + len(tally.acked))
    sent = tally.sent
    rows = [(m, at) for m, at in stored(stack, ids) if m in sent]
    latencies = [at.timestamp() - sent[m] for m, at in rows]
    summary = {
        "rate_per_s": round(len(tally.acked) / seconds),
        "published": len(sent),
        "acknowledged": len(tally.acked),
        "stored": len(rows),
        "lost": len(set(tally.acked) - {m for m, _ in rows}),
        **in_ms(latencies),
    }
    return summary, rows, published_until


def mqtt_end_to_end(stack: LocalStack) -> dict:
    say("  MQTT: saturating for 15 s")
    saturated, rows, published_until = mqtt_run(stack, "bench", None, WINDOW_S)
    # Only commits made while the devices were publishing: the backlog drained afterwards
    # goes faster, with the devices' and the broker's share of the machine free.
    commits = sorted(t for _, at in rows if (t := at.timestamp()) <= published_until)
    span = published_until - commits[0] if commits else 1.0
    sustained = len(commits) / span
    result = {**saturated, "sustained_per_s": round(sustained)}
    for share in (0.5, 0.9):
        say(f"  MQTT: {share:.0%} of sustained ({sustained * share:.0f}/s) for 15 s")
        result[f"at_{int(share * 100)}pct"], _, _ = mqtt_run(
            stack, f"lat{int(share * 100)}", sustained * share, WINDOW_S
        )
    return result


def worker_drain(stack: LocalStack, messages: int = 50_000) -> dict:
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
    commits = sorted(at.timestamp() for _, at in stored(stack, [device]))
    span = commits[-1] - commits[0]
    return {"messages": messages, "stored": count, "rows_per_s": round(count / span)}


def http_end_to_end(stack: LocalStack, connections: int = CONNECTIONS) -> dict:
    """wrk posting heartbeats; `stored_per_s` counts until the last of them was committed (it
    is lower than `requests_per_s` when the worker falls behind)."""
    (cred,) = register(stack, f"http-{int(time.time())}", 1)
    url = f"{stack.api_url}/api/v1/devices/{cred.device_id}/heartbeats"
    started = time.time()
    result = wrk(url, lua(cred.token), connections)
    result["stored"] = wait_drained(stack, [cred.device_id], result["accepted"])
    last_commit = max(at.timestamp() for _, at in stored(stack, [cred.device_id]))
    result["stored_per_s"] = round(result["stored"] / (last_commit - started))
    return result


def http_paced(stack: LocalStack, rate: float, connections: int = 4 * CONNECTIONS) -> dict:
    """wrk held near `rate` for WINDOW_S, and the receive-to-commit latency of every heartbeat
    (from its row: `received_at` set by the api, the commit time by PostgreSQL). The pause per
    connection is set from a 5-second probe run on another device; with many connections each
    pausing long, the rate depends little on how long the answers take."""
    probe, measured = register(stack, f"paced-{int(time.time())}", 2)
    url = f"{stack.api_url}/api/v1/devices/{{}}/heartbeats"
    cycle_ms = connections / rate * 1000
    delay = max(0, round(cycle_ms - 5))
    tried = wrk(url.format(probe.device_id), lua(probe.token, delay), connections, seconds=5)
    delay = max(0, round(delay + cycle_ms - connections / tried["requests_per_s"] * 1000))
    result = wrk(url.format(measured.device_id), lua(measured.token, delay), connections, WINDOW_S)
    stored_count = wait_drained(stack, [measured.device_id], result["accepted"])
    rows = stored(stack, [measured.device_id], heartbeats.c.received_at)
    latencies = [(committed - received).total_seconds() for received, committed in rows]
    return {
        "target_per_s": round(rate),
        "rate_per_s": result["requests_per_s"],
        "delay_ms": delay,
        "accepted": result["accepted"],
        "stored": stored_count,
        "response_latency": result["latency"],
        **in_ms(latencies),
    }


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def soak(stack: LocalStack, rate: float, seconds: float = SOAK_S) -> dict:
    """MQTT at `rate` for five minutes: the worker's memory over time, and latency throughout."""
    pid = stack.component("worker").pid()
    samples: list[tuple[float, float]] = []
    last_line = 0.0

    def sample(tally: Tally, elapsed: float) -> None:
        nonlocal last_line
        samples.append((elapsed, rss_mb(pid)))
        if elapsed - last_line >= 30:
            last_line = elapsed
            say(
                f"  soak: {elapsed:3.0f}/{seconds:.0f} s, {len(tally.acked):,} acknowledged, "
                f"worker RSS {samples[-1][1]:.1f} MB"
            )

    summary, _, _ = mqtt_run(stack, "soak", rate, seconds, sample)
    first_minute = max(rss for t, rss in samples if t <= 60)
    peak = max(rss for _, rss in samples)
    return {
        "seconds": seconds,
        **summary,
        "worker_rss_mb_first_minute_peak": round(first_minute, 1),
        "worker_rss_mb_peak": round(peak, 1),
        "worker_rss_mb_end": round(samples[-1][1], 1),
        "worker_rss_growth_pct": round((peak - first_minute) / first_minute * 100, 1),
    }


def process_usage(stack: LocalStack) -> dict:
    usage = {}
    for name in ("bridge", "worker", "api"):
        pid = stack.component(name).pid()
        if pid is None:
            continue
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
        peak = re.search(r"VmHWM:\s+(\d+) kB", status)
        usage[name] = {
            "cpu_s": round((int(stat[11]) + int(stat[12])) / 100, 1),
            "peak_rss_mb": round(int(peak.group(1)) / 1024, 1) if peak else None,
        }
    return usage


def main() -> int:
    require_system_packages({"wrk": "wrk"})
    RESULTS.mkdir(exist_ok=True)
    stack = LocalStack.bench()
    stack.down(echo=False)
    started = time.monotonic()
    try:
        stack.up(apps=False, echo=False)
        stack.empty()  # each run starts from nothing stored
        stack.up(echo=False)
        ceiling_creds = register(stack, f"ceiling-{int(time.time())}", MQTT_DEVICES)
        say("(a) broker alone")
        broker = broker_ceiling(stack, ceiling_creds)
        say("(b) PostgreSQL alone (COPY)")
        postgres = postgres_ceiling(stack)
        (http_cred,) = register(stack, f"bare-{int(time.time())}", 1)
        say(f"(c) uvicorn alone, {CONNECTIONS} and {FEW_CONNECTIONS} connections")
        bare = uvicorn_ceiling(http_cred.token, CONNECTIONS)
        bare_few = uvicorn_ceiling(http_cred.token, FEW_CONNECTIONS)
        say("MQTT end to end")
        mqtt = mqtt_end_to_end(stack)
        say("worker alone (draining a backlog)")
        drain = worker_drain(stack)
        say(f"HTTP end to end, {CONNECTIONS} connections")
        http = http_end_to_end(stack)
        usage = process_usage(stack)
        for share in (0.5, 0.9):
            target = http["stored_per_s"] * share
            say(f"  HTTP: {share:.0%} of sustained ({target:.0f}/s) for {WINDOW_S:.0f} s")
            http[f"at_{int(share * 100)}pct"] = http_paced(stack, target)
        say(f"HTTP end to end, {FEW_CONNECTIONS} connections")
        http_few = http_end_to_end(stack, FEW_CONNECTIONS)
        say("HTTP end to end, two api processes")
        stack.stop_app("api")
        stack.app_env["GATEWAY_API_WORKERS"] = "2"
        stack.start_app("api")
        stack.wait_apps(("api",))
        http_two = http_end_to_end(stack)
        say(f"soak: MQTT at 50% of sustained for {SOAK_S:.0f} s (worker memory)")
        soaked = soak(stack, mqtt["sustained_per_s"] * 0.5)
    except (StackError, subprocess.CalledProcessError) as exc:
        say(f"bench failed: {exc}")
        return 1
    finally:
        stack.down(echo=False)
    ratios = {
        "mqtt_e2e_over_broker": round(mqtt["sustained_per_s"] / broker["consumed_per_s"], 2),
        "http_e2e_over_uvicorn": round(http["stored_per_s"] / bare["requests_per_s"], 2),
        f"http_e2e_over_uvicorn_{FEW_CONNECTIONS}_connections": round(
            http_few["stored_per_s"] / bare_few["requests_per_s"], 2
        ),
        "http_e2e_two_api_processes_over_uvicorn": round(
            http_two["stored_per_s"] / bare["requests_per_s"], 2
        ),
        "worker_over_copy": round(drain["rows_per_s"] / postgres["rows_per_s"], 2),
    }
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started),
        "ceilings": {
            "broker": broker,
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
        "ratios": ratios,
        # MQTT: every acknowledged msg_id stored; HTTP (wrk sends no msg_id): counts.
        "no_loss": all(
            run["lost"] == 0 for run in (mqtt, mqtt["at_50pct"], mqtt["at_90pct"], soaked)
        )
        and all(
            h["stored"] >= h["accepted"]
            for h in (http, http["at_50pct"], http["at_90pct"], http_few, http_two)
        ),
    }
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-throughput.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    say(json.dumps(results, indent=2))
    say(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
