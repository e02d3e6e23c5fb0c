"""History at scale: the same operator reads at 1 million and at 50 million heartbeats.

Generated data, loaded with COPY into the partitioned `heartbeats` of a database of its own on
the bench stack (loopback only): 100,000 devices over 25 daily partitions, and 20 probe devices
with one heartbeat a minute over the last day (the same in both sizes). Through the real api
it times:

  device page      GET /devices/{id} (state and link quality over the last hour)
  history page 1   GET /devices/{id}/heartbeats?limit=100
  history page 10  the same, nine cursors deep (probes only: other devices have fewer pages)
  one-day buckets  GET /devices/{id}/metrics?name=cpu&name=mem, 1-minute buckets over 24 h

each read three ways:

  hot    the 20 probes, read again and again (after 20 warm-up requests)
  cold   random devices, each read once, never read before in this run: their pages are in
         PostgreSQL's buffers only if a neighbour's read brought them (the operating system's
         page cache may still hold them from the load: dropping it takes root on the server)
  warm   the same random devices, read a second time right after

and a worker batch of 500 new heartbeats (its insert skips copies stored on earlier days).
It reports p50 and p99 at both sizes and their ratio, writes bench/results/<date>-history.json,
and drops its database at the end (`--keep` keeps it, and a later run reuses it: the random
devices differ from run to run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import psycopg2
from sqlalchemy import create_engine

from gateway.contract.messages import DEDUP_WINDOW_DAYS, Heartbeat, Source
from gateway.contract.payload import HeartbeatPayload
from gateway.devtools.localstack import LocalStack, StackError
from gateway.devtools.simulate import percentiles
from gateway.storage import partitions, writes
from gateway.storage.engine import migrate

RESULTS = Path(__file__).parent / "results"
DATABASE = "history_{size}"
DEVICES = 100_000
DAYS = 25
PROBES = 20
SIZES = (1_000_000, 50_000_000)
REQUESTS = 200
WARMUP = 20
PAGE = 100
DEEP_PAGE = 10
COLUMNS = (
    "id, stored_on, device_id, msg_id, seq, device_ts, received_at, stored_at, source, metrics"
)


def say(text: str, end: str = "\n") -> None:
    print(text, end=end, flush=True)


# ---- data -------------------------------------------------------------------------------------


class Rows(io.RawIOBase):
    """COPY text rows from a generator, read by psycopg2 in chunks."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self._chunk = b""
        self._at = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._at >= len(self._chunk):
            text = "".join(line for _, line in zip(range(5000), self._lines, strict=False))
            if not text:
                return b""
            self._chunk, self._at = text.encode(), 0
        end = len(self._chunk) if size < 0 else self._at + size
        out = self._chunk[self._at : end]
        self._at = end
        return out


def copy(cur, lines: Iterator[str]) -> None:
    cur.copy_expert(f"COPY heartbeats ({COLUMNS}) FROM STDIN", Rows(lines), size=1 << 20)


def background(first: int, count: int, today: date, progress) -> Iterator[str]:
    """`count` heartbeats of the 100,000 devices, spread over DAYS days, day by day (so COPY
    fills one partition after another). Row `i` is the same whatever the batch."""
    times = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86400)]
    metrics = [
        json.dumps({"cpu": k * 7 % 100 + 0.5, "mem": k * 13 % 100 + 0.25, "temp_c": 40 + k % 20})
        for k in range(1000)
    ]
    start_day = today - timedelta(days=DAYS - 1)
    ids = ""
    for n in range(count):
        i = first + n
        if n % 100_000 == 0:
            ids = os.urandom(16 * 100_000).hex()
            if n % 1_000_000 == 0:
                progress(n)
        day = start_day + timedelta(days=n * DAYS // count)
        at = f"{day} {times[(i * 104_729) % 86_400]}+00"
        yield (
            f"{ids[(n % 100_000) * 32 : (n % 100_000) * 32 + 32]}\t{day}\t"
            f"dev-{(i * 7919) % DEVICES:06d}\tbg-{i}\t{i}\t{at}\t{at}\t{at}\tmqtt\t"
            f"{metrics[i % 1000]}\n"
        )


def probe_rows(now: datetime) -> Iterator[str]:
    """One heartbeat a minute over the last 24 hours for each probe device."""
    for p in range(PROBES):
        for m in range(24 * 60):
            at = now - timedelta(minutes=m, seconds=p)
            ts = at.isoformat()
            payload = json.dumps({"cpu": m % 100 + 0.5, "mem": 50.0 + p, "rssi": -60 - m % 10})
            yield (
                f"{os.urandom(16).hex()}\t{at.date()}\tprobe-{p:02d}\tp-{m}\t{24 * 60 - m}\t"
                f"{ts}\t{ts}\t{ts}\tmqtt\t{payload}\n"
            )


def without_indexes(cur, load) -> None:
    """Bulk load the way one restores: drop the indexes, COPY, build them again per partition."""
    cur.execute("ALTER TABLE heartbeats DROP CONSTRAINT heartbeats_pkey")
    cur.execute("DROP INDEX ix_heartbeats_device_received")
    load()
    say("  building indexes")
    cur.execute("SET maintenance_work_mem = '1GB'")
    cur.execute("ALTER TABLE heartbeats ADD CONSTRAINT heartbeats_pkey PRIMARY KEY (id, stored_on)")
    cur.execute(
        "CREATE INDEX ix_heartbeats_device_received ON heartbeats (device_id, received_at, id)"
    )
    cur.execute("VACUUM ANALYZE heartbeats")


def grow_to(dsn: str, size: int, now: datetime) -> float:
    """Load heartbeats until the table holds `size` rows; returns seconds spent."""
    started = time.monotonic()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM heartbeats")
    have = cur.fetchone()[0]
    if have >= size:  # kept from an earlier run (--keep): the probes' day must end now
        probes = [f"probe-{p:02d}" for p in range(PROBES)]
        cur.execute("DELETE FROM heartbeats WHERE device_id = ANY(%s)", (probes,))
        copy(cur, probe_rows(now))
        cur.execute("UPDATE devices SET last_seen = now() WHERE device_id = ANY(%s)", (probes,))
        cur.execute("ANALYZE heartbeats")
        return 0.0
    today = now.date()
    if have == 0:
        engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg2://"))
        with engine.begin() as sa:
            for d in range(DAYS + 1):
                partitions.create(sa, today - timedelta(days=DAYS - 1) + timedelta(days=d))
            partitions.maintain(sa, ahead_days=3, retention_days=0)
        engine.dispose()
        cur.execute(
            """
            INSERT INTO devices (device_id, heartbeat_interval_s, first_seen, last_seen, status,
                                 status_changed_at, status_reason, offline_deadline, last_metrics)
            SELECT 'dev-' || lpad(n::text, 6, '0'), 1800, now() - interval '25 days',
                   now() - (n %% 3600) * interval '1 second',
                   CASE WHEN n %% 10 = 0 THEN 'offline' ELSE 'online' END, now(), 'heartbeat',
                   now() + interval '1 hour', '{"cpu": 10}'
            FROM generate_series(0, %s) AS n
            """,
            (DEVICES - 1,),
        )
        cur.execute(
            """
            INSERT INTO devices (device_id, heartbeat_interval_s, first_seen, last_seen, status,
                                 status_changed_at, status_reason, offline_deadline, last_metrics)
            SELECT 'probe-' || lpad(n::text, 2, '0'), 60, now() - interval '1 day', now(),
                   'online', now(), 'heartbeat', now() + interval '3 minutes', '{"cpu": 10}'
            FROM generate_series(0, %s) AS n
            """,
            (PROBES - 1,),
        )
        copy(cur, probe_rows(now))
        have = PROBES * 24 * 60
    count = size - have

    def progress(n: int) -> None:
        if sys.stdout.isatty():
            say(f"\r  COPY {n:>11,} / {count:,} rows", end="")
        elif n % 10_000_000 == 0:
            say(f"  COPY {n:>11,} / {count:,} rows")

    def load() -> None:
        copy(cur, background(have, count, today, progress))
        say(f"\r  COPY {count:>11,} / {count:,} rows")

    without_indexes(cur, load)
    conn.close()
    return time.monotonic() - started


# ---- reads ------------------------------------------------------------------------------------


def timed(client: httpx.Client, requests: list[tuple[str, dict]], warmup: int = 0) -> dict:
    """p50, p95 and p99 in ms of `requests` made one after the other, the first `warmup` of
    them not counted."""
    took = []
    for n, (path, params) in enumerate(requests):
        started = time.perf_counter()
        response = client.get(path, params=params)
        if n >= warmup:
            took.append(time.perf_counter() - started)
        response.raise_for_status()
    return {k: round(v * 1000, 2) for k, v in percentiles(took).items()}


def day_window(now: datetime) -> dict:
    return {
        "name": ["cpu", "mem"],
        "since": (now - timedelta(days=1)).isoformat(),
        "until": now.isoformat(),
        "bucket": "1m",
        "agg": "avg",
    }


def reads(now: datetime) -> dict[str, Callable[[str], tuple[str, dict]]]:
    """Each read, as the request it makes for a device."""
    return {
        "device_page": lambda d: (f"/devices/{d}", {}),
        "history_page_1": lambda d: (f"/devices/{d}/heartbeats", {"limit": PAGE}),
        "one_day_buckets": lambda d: (f"/devices/{d}/metrics", day_window(now)),
    }


def hot(client: httpx.Client, now: datetime, requests: int) -> dict:
    """The probes, read again and again (the method of the first runs, kept for comparison)."""
    probes = [f"probe-{p % PROBES:02d}" for p in range(WARMUP + requests)]
    result = {
        name: timed(client, [read(d) for d in probes], WARMUP) for name, read in reads(now).items()
    }
    cursors = {}
    for d in set(probes):
        cursor = None
        for _ in range(DEEP_PAGE - 1):
            page = client.get(
                f"/devices/{d}/heartbeats", params={"limit": PAGE, "cursor": cursor}
            ).json()
            cursor = page["next_cursor"]
        cursors[d] = cursor
    deep = [(f"/devices/{d}/heartbeats", {"limit": PAGE, "cursor": cursors[d]}) for d in probes]
    result[f"history_page_{DEEP_PAGE}"] = timed(client, deep, WARMUP)
    sample = client.get(f"/devices/{probes[0]}/metrics", params=day_window(now)).json()
    result["one_day_buckets"]["buckets"] = len(sample["series"]["cpu"])
    return result


def cold_and_warm(client: httpx.Client, now: datetime, requests: int, rng: random.Random):
    """Each read over `requests` random devices no read of this run touched before (a
    different set per read), then over the same devices again."""
    devices = [f"dev-{n:06d}" for n in rng.sample(range(DEVICES), requests * len(reads(now)))]
    cold, warm = {}, {}
    for i, (name, read) in enumerate(reads(now).items()):
        mine = [read(d) for d in devices[i * requests : (i + 1) * requests]]
        cold[name] = timed(client, mine)
        warm[name] = timed(client, mine)
    return cold, warm


def measure(stack: LocalStack, dsn: str, now: datetime, requests: int, rng: random.Random):
    headers = {"Authorization": f"Bearer {stack.operator_token()}"}
    with httpx.Client(base_url=stack.api_url + "/api/v1", headers=headers, timeout=30) as client:
        result = {"hot": hot(client, now, requests)}
        result["cold"], result["warm"] = cold_and_warm(client, now, requests, rng)
    result["worker_batch_500"] = batch_writes(dsn, DEDUP_WINDOW_DAYS)
    result["worker_batch_500_all_days"] = batch_writes(dsn, 0)
    return result


def batch_writes(dsn: str, window_days: int, batches: int = 12) -> dict:
    """A worker's write of 500 new heartbeats: the insert, and the lookup of the ids in the
    partitions of the `window_days` days before (0: every day)."""
    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg2://"))
    took = []
    tag = int(time.time())
    for b in range(batches):
        beats = [
            Heartbeat.from_payload(
                f"dev-{(b * 500 + i) % DEVICES:06d}",
                HeartbeatPayload(msg_id=f"w{window_days}-{tag}-{b}-{i}", metrics={"cpu": 1.0}),
                Source.MQTT,
            )
            for i in range(500)
        ]
        started = time.perf_counter()
        with engine.begin() as conn:
            writes.write_batch(conn, beats, dedup_window_days=window_days)
        took.append(time.perf_counter() - started)
    engine.dispose()
    took = took[2:]  # the first batches warm the connection and caches
    return {"p50": round(statistics.median(took) * 1000, 1), "max": round(max(took) * 1000, 1)}


# ---- run --------------------------------------------------------------------------------------


def table(results: dict) -> str:
    small, large = (results["sizes"][str(s)] for s in results["size_list"])
    a_name, b_name = (f"{s:,}" for s in results["size_list"])
    lines = [
        f"| read | p50 at {a_name} | p99 at {a_name} | p50 at {b_name} | p99 at {b_name} "
        "| ratio p50 | ratio p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for way in ("hot", "cold", "warm"):
        for name, a in small[way].items():
            b = large[way][name]
            lines.append(
                f"| {way}: {name.replace('_', ' ')} | {a['p50']} ms | {a['p99']} ms | "
                f"{b['p50']} ms | {b['p99']} ms | {b['p50'] / a['p50']:.2f} | "
                f"{b['p99'] / a['p99']:.2f} |"
            )
    for name, what in (
        (
            "worker_batch_500",
            f"worker batch of 500, copies looked for {DEDUP_WINDOW_DAYS} days back",
        ),
        ("worker_batch_500_all_days", f"the same, in all {DAYS} days"),
    ):
        a, b = small[name], large[name]
        lines.append(
            f"| {what} | {a['p50']} ms | (max {a['max']}) | {b['p50']} ms | "
            f"(max {b['max']}) | {b['p50'] / a['p50']:.2f} | |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the generated database")
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=SIZES, help="the two sizes, in heartbeats"
    )
    parser.add_argument("--requests", type=int, default=REQUESTS, help="timed reads of each kind")
    parser.add_argument("--out", type=Path, help="the results file (default: bench/results/)")
    args = parser.parse_args()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    RESULTS.mkdir(exist_ok=True)
    base = LocalStack.bench()
    server = base.database_url.rsplit("/", 1)[0].replace("+psycopg2", "")
    stack = LocalStack(base.name, base.ports)
    stack.down(echo=False)
    started = time.monotonic()
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "size_list": args.sizes,
        "requests": args.requests,
        "seed": seed,
        "sizes": {},
    }
    admin = None
    try:
        stack.up(apps=False, echo=False)
        admin = psycopg2.connect(base.database_url.replace("+psycopg2", ""))
        admin.autocommit = True
        now = datetime.now(UTC).replace(microsecond=0)
        for size in args.sizes:
            database = DATABASE.format(size=size)
            dsn = f"{server}/{database}"
            with admin.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{database}"')
            migrate(dsn.replace("://", "+psycopg2://", 1))
            say(f"{size:,} heartbeats")
            loaded = grow_to(dsn, size, now)
            with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM heartbeats")
                rows = cur.fetchone()[0]
                cur.execute(
                    "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                    "WHERE inhparent = 'heartbeats'::regclass"
                )
                on_disk = int(cur.fetchone()[0])
            say(f"  {rows:,} rows, {on_disk / 2**30:.1f} GiB; timing reads")
            stack.app_env["GATEWAY_DATABASE_URL"] = dsn.replace("://", "+psycopg2://", 1)
            stack.start_app("api")
            stack.wait_apps(("api",))
            results["sizes"][str(size)] = {
                "rows": rows,
                "gib": round(on_disk / 2**30, 2),
                "load_s": round(loaded),
                **measure(stack, dsn, now, args.requests, rng),
            }
            stack.stop_app("api")
    except (StackError, httpx.HTTPError, psycopg2.Error) as exc:
        say(f"bench failed: {exc}")
        return 1
    finally:
        if admin is not None:
            if not args.keep:
                with admin.cursor() as cur:
                    for size in args.sizes:
                        database = DATABASE.format(size=size)
                        cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            admin.close()
        stack.down(echo=False)
    results["seconds"] = round(time.monotonic() - started)
    results["partitions"] = DAYS + 4
    out = args.out or RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-history.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    say(table(results))
    say(f"written to {out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
