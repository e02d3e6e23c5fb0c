"""History: keyset pages of heartbeats, and metrics in time buckets computed by PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from support import Device

from gateway.contract.messages import Heartbeat, Source
from gateway.contract.payload import HeartbeatPayload
from gateway.storage import writes

pytestmark = pytest.mark.e2e

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def seed(engine: Engine, device: Device, points: list[tuple[int, dict]]) -> None:
    """Heartbeats as the worker stores them, at chosen receive times (seconds after T0)."""
    beats = [
        Heartbeat.from_payload(
            device.device_id,
            HeartbeatPayload(msg_id=f"h-{i}", seq=i, metrics=metrics),
            Source.MQTT,
            received_at=T0 + timedelta(seconds=offset),
        )
        for i, (offset, metrics) in enumerate(points)
    ]
    with engine.begin() as conn:
        writes.write_batch(conn, beats)


def series(api, device: Device, **params) -> dict:
    response = api.get(
        f"/api/v1/devices/{device.device_id}/metrics",
        params={"since": T0.isoformat(), "until": (T0 + timedelta(hours=1)).isoformat(), **params},
    )
    assert response.status_code == 200, response.text
    return response.json()["series"]


def test_metric_buckets(api, engine: Engine, device: Device) -> None:
    seed(
        engine,
        device,
        [
            (5, {"cpu": 10.0, "fw": "1.0"}),
            (30, {"cpu": 20.0}),
            (65, {"cpu": 40.0, "fw": "1.1"}),
            (190, {"cpu": 5.0, "temp": 50}),
        ],
    )
    avg = series(api, device, name=["cpu", "temp"], bucket="1m", agg="avg")
    assert [(p["t"], p["value"]) for p in avg["cpu"]] == [
        ("2026-11-01T12:00:00Z", 15.0),
        ("2026-11-01T12:01:00Z", 40.0),
        ("2026-11-01T12:03:00Z", 5.0),  # 12:02 had no heartbeat: absent
    ]
    assert [p["value"] for p in avg["temp"]] == [50.0]
    assert [p["value"] for p in series(api, device, name="cpu", bucket="5m", agg="max")["cpu"]] == [
        40.0
    ]
    assert [p["value"] for p in series(api, device, name="cpu", bucket="1m", agg="min")["cpu"]] == [
        10.0,
        40.0,
        5.0,
    ]
    counts = series(api, device, name=["cpu", "fw"], bucket="1h", agg="count")
    assert [p["value"] for p in counts["cpu"]] == [4]
    assert [p["value"] for p in counts["fw"]] == [2]
    last = series(api, device, name="fw", bucket="1m", agg="last")["fw"]
    assert [p["value"] for p in last] == ["1.0", "1.1"]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"name": "cpu", "bucket": "1y"}, "bucket"),
        ({"name": "cpu", "bucket": "1s", "since": "2026-01-01T00:00:00Z"}, "buckets"),
        ({"name": "bad name"}, "name"),
        ({"name": "cpu", "agg": "median"}, "agg"),
        ({}, "name"),
    ],
)
def test_metric_query_errors(api, device: Device, params: dict, words: str) -> None:
    response = api.get(f"/api/v1/devices/{device.device_id}/metrics", params=params)
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]


def test_history_pages_newest_first_without_gaps(api, engine: Engine, device: Device) -> None:
    seed(engine, device, [(i, {"n": i}) for i in range(25)])
    seen, cursor = [], None
    while True:
        params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        page = api.get(f"/api/v1/devices/{device.device_id}/heartbeats", params=params).json()
        seen += [h["metrics"]["n"] for h in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(24, -1, -1))
    window = api.get(
        f"/api/v1/devices/{device.device_id}/heartbeats",
        params={
            "since": (T0 + timedelta(seconds=10)).isoformat(),
            "until": (T0 + timedelta(seconds=15)).isoformat(),
        },
    ).json()["items"]
    assert [h["metrics"]["n"] for h in window] == [14, 13, 12, 11, 10]
