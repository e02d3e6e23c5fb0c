"""A device that floods dead letters is capped: at most N kept per device and hour, the rest
counted in one `over_cap` entry per device and hour (and a metric), never silently lost; exact
across concurrent workers, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import httpx
import pytest
from inprocess import worker_for
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select
from support import apoll, poll, serving, unique

from gateway.amqp.publisher import Publisher
from gateway.contract.messages import Rejection, Source
from gateway.contract.reasons import InputError, Reason
from gateway.devtools.localstack import LocalStack
from gateway.storage import writes
from gateway.storage.schema import rejected, rejected_counts

pytestmark = pytest.mark.integration

GATEWAY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "gateway")


def fresh_hour() -> datetime:
    """An hour no other test (or earlier run) counts in: far ahead, so retention leaves it."""
    return datetime(3000, 1, 1, tzinfo=UTC) + timedelta(hours=random.randrange(10**6))


def flood(
    device_id: str | None, count: int, hour: datetime, source: Source = Source.MQTT
) -> list[Rejection]:
    return [
        Rejection.of(
            InputError(Reason.NOT_JSON, "payload is not JSON"),
            f"junk {i}".encode(),
            source,
            device_id=device_id,
            received_at=hour + timedelta(milliseconds=i),
        )
        for i in range(count)
    ]


def stored(engine: Engine, device_id: str | None, hour: datetime) -> dict[str, list]:
    """A device's dead letters of the hour, by reason."""
    r = rejected.c
    owner = r.device_id.is_(None) if device_id is None else r.device_id == device_id
    with engine.connect() as conn:
        rows = conn.execute(
            select(r.reason, r.detail).where(
                owner, r.received_at >= hour, r.received_at < hour + timedelta(hours=1)
            )
        ).all()
    found: dict[str, list] = {}
    for reason, detail in rows:
        found.setdefault(reason, []).append(detail)
    return found


def write(engine: Engine, batch: list[Rejection], cap: int) -> writes.RejectionsWritten:
    with engine.begin() as conn:
        return writes.write_rejections(conn, batch, cap_per_hour=cap)


def test_a_flood_is_capped_exactly_across_concurrent_workers(engine: Engine) -> None:
    """Four writers store interleaved batches of one flooding device, a quiet device and
    dead letters without a device: kept + counted = received, for each of them."""
    cap = 50
    hour = fresh_hour()
    loud, quiet = unique("loud"), unique("quiet")
    letters = flood(loud, 230, hour) + flood(quiet, 7, hour) + flood(None, 61, hour)
    random.Random(7).shuffle(letters)
    batches = [letters[i : i + 12] for i in range(0, len(letters), 12)]
    results: list[writes.RejectionsWritten] = []
    lock = threading.Lock()

    def writer(mine: list[list[Rejection]]) -> None:
        for batch in mine:
            done = write(engine, batch, cap)
            with lock:
                results.append(done)

    threads = [threading.Thread(target=writer, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    kept = sum(r.kept for r in results)
    over = sum(n for r in results for n in r.over_cap.values())
    assert kept + over == len(letters)
    assert (kept, over) == (cap + 7 + cap, 180 + 11)

    flooded = stored(engine, loud, hour)
    assert len(flooded["not_json"]) == cap
    assert flooded["over_cap"] == [
        f"180 counted, not kept: over the cap of {cap} dead letters per device in the hour "
        f"from {hour:%Y-%m-%dT%H}:00Z"
    ]
    assert stored(engine, quiet, hour) == {"not_json": ["payload is not JSON"] * 7}
    anonymous = stored(engine, None, hour)
    assert len(anonymous["not_json"]) == cap
    assert [d.split(" ")[0] for d in anonymous["over_cap"]] == ["11"]
    with engine.connect() as conn:
        counted = conn.scalar(
            select(func.sum(rejected_counts.c.received)).where(rejected_counts.c.hour == hour)
        )
    assert counted == len(letters)


def test_a_redelivered_batch_is_not_counted_again(engine: Engine) -> None:
    hour = fresh_hour()
    device = unique()
    batch = flood(device, 3, hour)
    assert write(engine, batch, cap=3) == writes.RejectionsWritten(kept=3)
    assert write(engine, batch, cap=3) == writes.RejectionsWritten(kept=0)
    more = flood(device, 2, hour + timedelta(seconds=1), Source.HTTP)
    assert write(engine, more, cap=3) == writes.RejectionsWritten(kept=0, over_cap={"http": 2})
    assert [d.split(" ")[0] for d in stored(engine, device, hour)["over_cap"]] == ["2"]
    # The next hour has an allowance of its own.
    later = flood(device, 3, hour + timedelta(hours=1))
    assert write(engine, later, cap=3).kept == 3


def test_no_cap_keeps_everything(engine: Engine) -> None:
    hour = fresh_hour()
    device = unique()
    assert write(engine, flood(device, 40, hour), cap=0) == writes.RejectionsWritten(kept=40)
    assert list(stored(engine, device, hour)) == ["not_json"]


def test_text_postgresql_cannot_hold_is_stored_escaped(engine: Engine) -> None:
    """A NUL or a lone surrogate in a dead letter's text would fail its whole batch: they are
    written as escapes, so what was there is still readable."""
    hour = fresh_hour()
    device = unique()
    odd = Rejection.of(
        InputError(Reason.INVALID_MESSAGE, "bad \x00 byte"),
        b"\x00",
        Source.WORK_QUEUE,
        device_id=device,
        topic="devices/\ud800/heartbeat",
        received_at=hour,
    )
    assert write(engine, [odd, *flood(device, 2, hour)], cap=10).kept == 3
    with engine.connect() as conn:
        row = conn.execute(select(rejected).where(rejected.c.id == odd.id)).mappings().one()
    assert (row["detail"], row["topic"]) == ("bad \\x00 byte", "devices/\\ud800/heartbeat")
    assert bytes(row["payload"]) == b"\x00"


def over_cap_metric(source: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "gateway_dead_letters_over_cap_messages_total", {"source": source}
        )
        or 0
    )


@pytest.mark.e2e
def test_the_worker_caps_a_flood_and_operators_see_the_count(
    vhost: str, apps: LocalStack, api: httpx.Client, engine: Engine
) -> None:
    """Dead letters through the worker (cap 3): 3 kept, and one `over_cap` entry counting the
    other 7, in the API's dead-letter list, `gateway rejected list` and the metric; a replay
    leaves the count alone."""
    device = unique("flood")
    hour = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    letters = flood(device, 10, hour)
    before = over_cap_metric("mqtt")

    async def scenario() -> None:
        async with await aio_pika.connect_robust(vhost) as conn:
            publisher = await Publisher.open(conn, timeout=10)
            for letter in letters:
                await publisher.publish_rejection(letter)
            async with serving(worker_for(vhost, apps, dead_letter_cap_per_hour=3)):
                await apoll(
                    lambda: (
                        "over_cap" in stored(engine, device, hour)
                        and over_cap_metric("mqtt") - before == 7
                    ),
                    what="the over_cap entry and its metric",
                )

    asyncio.run(scenario())
    listed = poll(
        lambda: (
            (r := api.get("/api/v1/rejected", params={"device_id": device})).status_code == 200
            and len(items := r.json()["items"]) == 4
            and items
        ),
        what="4 entries in the dead-letter list",
    )
    assert sorted(i["reason"] for i in listed) == ["not_json"] * 3 + ["over_cap"]
    (entry,) = api.get(
        "/api/v1/rejected", params={"device_id": device, "reason": "over_cap"}
    ).json()["items"]
    assert entry["detail"].startswith("7 counted, not kept: over the cap of 3 dead letters")
    assert (entry["source"], entry["size"], entry["payload"]) == ("mqtt", 0, "")

    def gateway(*args: str) -> str:
        done = subprocess.run(
            [GATEWAY, "rejected", *args, "--device", device],
            env=apps.env("api"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = gateway("list")
    assert "over_cap" in listing and "7 counted, not kept" in listing
    assert listing.rstrip().endswith("4 dead letters")
    replay = gateway("replay", "--dry-run", "--reason", "over_cap")
    assert "0 would be replayed, 1 still invalid" in replay
