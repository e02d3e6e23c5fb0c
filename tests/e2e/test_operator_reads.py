"""Operator reads are bounded and total: every time parameter has a range and a 422 that names
it, aggregations answer for any value a device may store, cursors are checked before use, and
a read that runs too long answers 503 with Retry-After, not a 500 or a hung request."""

from __future__ import annotations

import base64
import json
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, text
from support import OPERATOR_TOKEN, Device, poll

from api.app import create_app, layered
from api.context import Context
from gateway.contract.messages import Heartbeat, Source
from gateway.contract.payload import MAX_INT, HeartbeatPayload
from gateway.devtools.localstack import LocalStack
from gateway.storage import writes

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.e2e

NOW = datetime.now(UTC).replace(microsecond=0)
FLOAT_MAX = sys.float_info.max
#: Every operator route with a time window, and its other required parameters.
WINDOWED = {
    "heartbeats": ("/api/v1/devices/{device}/heartbeats", {}),
    "metrics": ("/api/v1/devices/{device}/metrics", {"name": "cpu"}),
    "rejected": ("/api/v1/rejected", {}),
}
#: Times that name no instant of years 1 to 9999 once in UTC.
OUT_OF_RANGE = [
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:59:59.999999+01:00",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:00:00-23:59",
]


def seed(engine: Engine, device: Device, metrics: list[dict], at: datetime = NOW) -> None:
    """Heartbeats as the worker stores them, a second apart, received at `at` onwards."""
    beats = [
        Heartbeat.from_payload(
            device.device_id,
            HeartbeatPayload(msg_id=f"m-{i}", metrics=m),
            Source.HTTP,
            received_at=at + timedelta(seconds=i),
        )
        for i, m in enumerate(metrics)
    ]
    with engine.begin() as conn:
        writes.write_batch(conn, beats)


def aggregate(api: httpx.Client, device: Device, name: str, agg: str) -> list:
    response = api.get(
        f"/api/v1/devices/{device.device_id}/metrics",
        params={
            "name": name,
            "agg": agg,
            "bucket": "1h",
            "since": (NOW - timedelta(hours=1)).isoformat(),
            "until": (NOW + timedelta(hours=1)).isoformat(),
        },
    )
    assert response.status_code == 200, response.text
    return [point["value"] for point in response.json()["series"][name]]


# ---- time parameters ---------------------------------------------------------------------------


def test_history_since_the_year_1_is_the_whole_history(
    api: httpx.Client, engine: Engine, device: Device
) -> None:
    seed(engine, device, [{"cpu": 1.0}, {"cpu": 2.0}])
    for since in ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00", "0001-01-01T00:00:00-05:00"):
        response = api.get(
            f"/api/v1/devices/{device.device_id}/heartbeats", params={"since": since}
        )
        assert response.status_code == 200, (since, response.text)
        assert [h["msg_id"] for h in response.json()["items"]] == ["m-1", "m-0"]
    late = api.get(
        f"/api/v1/devices/{device.device_id}/heartbeats",
        params={"since": "9999-12-31T23:59:59.999999Z", "until": "9999-12-31T23:59:59.999999Z"},
    )
    assert late.status_code == 200, late.text
    assert late.json()["items"] == []


@pytest.mark.parametrize("route", sorted(WINDOWED))
@pytest.mark.parametrize("parameter", ["since", "until"])
@pytest.mark.parametrize("value", OUT_OF_RANGE)
def test_a_time_out_of_range_is_a_422_that_names_it(
    api: httpx.Client, device: Device, route: str, parameter: str, value: str
) -> None:
    path, params = WINDOWED[route]
    response = api.get(path.format(device=device.device_id), params={**params, parameter: value})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"{parameter}: must be a time from 0001-01-01T00:00:00Z"), detail


def test_the_range_is_in_the_openapi_document(api: httpx.Client) -> None:
    document = api.get("/openapi.json").json()
    for route, (path, _) in WINDOWED.items():
        operation = document["paths"][path.replace("{device}", "{device_id}")]["get"]
        described = {p["name"]: p.get("description", "") for p in operation["parameters"]}
        for parameter in ("since", "until"):
            assert "0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z" in described[parameter], (
                route,
                parameter,
            )


def test_metrics_windows_at_the_ends_of_time(api: httpx.Client, device: Device) -> None:
    url = f"/api/v1/devices/{device.device_id}/metrics"
    # The default window (24 hours before `until`) stops at the earliest time there is.
    early = api.get(url, params={"name": "cpu", "until": "0001-01-01T12:00:00Z"})
    assert early.status_code == 200, early.text
    assert early.json()["since"] == "0001-01-01T00:00:00Z"
    assert early.json()["series"] == {"cpu": []}
    empty = api.get(url, params={"name": "cpu", "until": "0001-01-01T00:00:00Z"})
    assert empty.status_code == 422
    assert empty.json()["detail"] == "since must be before until"
    wide = api.get(
        url,
        params={
            "name": "cpu",
            "bucket": "99999d",
            "since": "0001-01-01T00:00:00Z",
            "until": "9999-12-31T23:59:59.999999Z",
        },
    )
    assert wide.status_code == 200, wide.text
    too_many = api.get(
        url,
        params={"name": "cpu", "since": "0001-01-01T00:00:00Z", "until": "9999-12-31T00:00Z"},
    )
    assert too_many.status_code == 422
    assert "buckets" in too_many.json()["detail"]


# ---- aggregations ------------------------------------------------------------------------------


def test_an_average_of_the_largest_floats_is_a_number(
    api: httpx.Client, engine: Engine, device: Device
) -> None:
    """Two heartbeats {"big": 1e308}: a float8 sum overflows; the answer is 1e308."""
    seed(engine, device, [{"big": 1e308}, {"big": 1e308}, {"max": FLOAT_MAX}, {"max": FLOAT_MAX}])
    assert aggregate(api, device, "big", "avg") == [1e308]
    assert aggregate(api, device, "max", "avg") == [FLOAT_MAX]
    assert aggregate(api, device, "max", "max") == [FLOAT_MAX]
    assert aggregate(api, device, "max", "count") == [2]


def test_aggregates_over_the_whole_range_of_numbers(
    api: httpx.Client, engine: Engine, device: Device
) -> None:
    seed(
        engine,
        device,
        [
            {"f": FLOAT_MAX, "i": MAX_INT, "tiny": 5e-324},
            {"f": -FLOAT_MAX, "i": -MAX_INT, "tiny": -5e-324},
            {"f": FLOAT_MAX, "i": MAX_INT - 1, "tiny": 5e-324},
        ],
    )
    assert aggregate(api, device, "f", "avg") == [FLOAT_MAX / 3]
    assert aggregate(api, device, "f", "min") == [-FLOAT_MAX]
    assert aggregate(api, device, "f", "max") == [FLOAT_MAX]
    # Integers stay exact (a float8 would round 2^63 - 2 to 2^63).
    assert aggregate(api, device, "i", "max") == [MAX_INT]
    assert aggregate(api, device, "i", "min") == [-MAX_INT]
    assert aggregate(api, device, "i", "avg") == [pytest.approx((MAX_INT - 2) / 3)]
    assert aggregate(api, device, "tiny", "min") == [-5e-324]
    assert aggregate(api, device, "tiny", "max") == [5e-324]
    assert aggregate(api, device, "tiny", "avg") == [pytest.approx(5e-324 / 3, abs=5e-324)]
    assert aggregate(api, device, "i", "last") == [MAX_INT - 1]


def test_an_exact_integer_maximum_is_not_rounded(
    api: httpx.Client, engine: Engine, device: Device
) -> None:
    seed(engine, device, [{"n": 2**53 + 1}, {"n": 2**53}])
    assert aggregate(api, device, "n", "max") == [2**53 + 1]
    assert aggregate(api, device, "n", "min") == [2**53]


# ---- other parameters --------------------------------------------------------------------------


def cursor_of(*values: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        cursor_of("²"),  # a digit to Python's isdigit, not to int()
        cursor_of("9" * 30),  # beyond bigint
        cursor_of("-1"),
        cursor_of("0001-01-01T00:00:00+01:00"),
        "%%%",
    ],
)
def test_a_cursor_this_api_did_not_issue_is_a_400(
    api: httpx.Client, device: Device, cursor: str
) -> None:
    response = api.get(f"/api/v1/devices/{device.device_id}/events", params={"cursor": cursor})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "cursor is not one this API returned"


def test_a_heartbeat_cursor_at_the_ends_of_time_reads_what_is_before_it(
    api: httpx.Client, engine: Engine, device: Device
) -> None:
    seed(engine, device, [{"cpu": 1.0}])
    url = f"/api/v1/devices/{device.device_id}/heartbeats"
    nil = "00000000-0000-0000-0000-000000000000"
    for at, items in (
        ("0001-01-01T00:00:00Z", []),
        ("9999-12-31T23:59:59.999999Z", ["m-0"]),
        # PostgreSQL refuses offsets over 15:59; in UTC, the time is fine.
        ((NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S-23:59"), ["m-0"]),
    ):
        page = api.get(url, params={"cursor": cursor_of(at, nil)})
        assert page.status_code == 200, page.text
        assert [h["msg_id"] for h in page.json()["items"]] == items
    # Beyond the ends once in UTC: no cursor this API returned.
    for at in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-15:59"):
        page = api.get(url, params={"cursor": cursor_of(at, nil)})
        assert page.status_code == 400, (at, page.text)


def test_long_and_huge_parameters_are_422s_that_name_them(
    api: httpx.Client, device: Device
) -> None:
    cases = [
        (f"/api/v1/devices/{device.device_id}/events", {"cursor": "A" * 10_000}, "cursor"),
        (f"/api/v1/devices/{device.device_id}/heartbeats", {"limit": str(2**64)}, "limit"),
        ("/api/v1/devices", {"limit": "9" * 5000}, "limit"),
        ("/api/v1/fleet", {"recent": str(-(2**63))}, "recent"),
        ("/api/v1/rejected", {"device_id": "d" * 201}, "device_id"),
        (f"/api/v1/devices/{device.device_id}/metrics", {"name": "n" * 65}, "name"),
        (
            f"/api/v1/devices/{device.device_id}/metrics",
            {"name": "cpu", "bucket": "100000d"},
            "bucket",
        ),
        (f"/api/v1/devices/{device.device_id}/heartbeats", {"since": "9" * 40}, "since"),
    ]
    for path, params, name in cases:
        response = api.get(path, params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["detail"].startswith(name), (params, response.text)


# ---- statement timeout -------------------------------------------------------------------------

TIMEOUT_MS = 300


@pytest.fixture
def impatient(apps: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Impatient]:
    """The api in this process, on the test stack, with a short statement timeout."""
    for key, value in apps.env("api").items():
        if key.startswith("GATEWAY_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("GATEWAY_API_STATEMENT_TIMEOUT_MS", str(TIMEOUT_MS))
    app = create_app()
    with TestClient(layered(app), headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}) as client:
        yield Impatient(client, app.state.context)


@dataclass
class Impatient:
    client: TestClient
    context: Context


def test_every_api_connection_has_the_statement_timeout(impatient: Impatient) -> None:
    for engine in (impatient.context.reads, impatient.context.engine):
        with engine.connect() as conn:
            assert conn.scalar(text("SHOW statement_timeout")) == f"{TIMEOUT_MS}ms"


def test_a_read_that_runs_too_long_is_a_503_with_retry_after(
    impatient: Impatient, engine: Engine
) -> None:
    """A dead-letter read that waits on a lock past the timeout is cut short: 503 and
    Retry-After; the next read, once the lock is gone, answers."""
    assert impatient.client.get("/api/v1/rejected", params={"limit": 1}).status_code == 200
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with engine.begin() as conn:
            conn.execute(text("LOCK TABLE rejected IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        response = impatient.client.get("/api/v1/rejected", params={"limit": 1})
    finally:
        release.set()
        holder.join(10)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert f"({TIMEOUT_MS} ms)" in response.json()["detail"]
    poll(
        lambda: impatient.client.get("/api/v1/rejected", params={"limit": 1}).status_code == 200,
        what="reads to answer again",
    )
