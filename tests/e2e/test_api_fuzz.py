"""Fuzz the HTTP API from its own OpenAPI document (schemathesis): never a 5xx, never a response
that breaks the documented schema. Every operation, positive and negative cases, with times
drawn from the whole range (years 1 and 9999, every offset); then every query parameter of
every read given extreme values (the ends of time, huge integers, long strings), and the
inputs that once gave a 500. The heartbeat route is fuzzed with a device's own token (the
operator's gets a 401 before the body is read): bodies from the documented schema and hostile
ones, each answered with a documented status, each refusal a dead letter."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import schemathesis
from hostile import payloads, valid_payloads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
)
from sqlalchemy import Engine, select
from support import OPERATOR_TOKEN, Device, history, poll

from gateway.contract.messages import MAX_REJECTED_BYTES
from gateway.contract.payload import MAX_INT, MAX_PAYLOAD_BYTES
from gateway.devtools.localstack import LocalStack
from gateway.storage.schema import heartbeats, rejected

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 40
AUTH = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
CALL = {
    "headers": AUTH,
    "timeout": 15,
    # A cursor is valid only if this API issued it, which no schema can say: a made-up one
    # gets 400 by design. Negative cases count an unknown query parameter (ignored, as HTTP
    # APIs do) and a missing Authorization (always given here) as invalid data; the values
    # that must be refused have tests that assert the 422. Every other check stays on.
    "excluded_checks": [positive_data_acceptance, negative_data_rejection],
}

#: Times at both ends of the range, with offsets that keep them inside it or push them out.
EXTREME_TIMES = [
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00",
    "0001-01-01T00:00:00+00:00",
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00-23:59",
    "0001-01-01T23:59:59+23:59",
    "0001-01-01",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59+23:59",
    "9999-12-31T00:00:00-23:59",
    "9999-12-31",
    "1970-01-01T00:00:00Z",
    "2026-02-29T00:00:00Z",
    "0",
    "-62135596800",
    "253402300800",
]
#: Extreme values for any query parameter: huge and negative integers, floats, long and odd
#: strings.
EXTREME_VALUES = [
    *EXTREME_TIMES,
    "",
    "-1",
    str(2**53 + 1),
    str(MAX_INT),
    str(2**63),
    str(-(2**63) - 1),
    str(2**64),
    "9" * 5000,
    "1e308",
    "-1.7976931348623157e308",
    "NaN",
    "x" * 10_000,
    "\x00",
    "²",
    "🙂" * 300,
    "../../etc/passwd",
]
#: What each read needs besides the parameter under test.
REQUIRED = {"/api/v1/devices/{device_id}/metrics": {"name": "big"}}

_offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
DATE_TIMES = st.one_of(
    st.sampled_from(EXTREME_TIMES),
    st.datetimes(
        min_value=datetime.min, max_value=datetime.max, timezones=st.none() | _offsets
    ).map(datetime.isoformat),
)


@pytest.fixture(scope="module")
def schema(apps: LocalStack):
    schemathesis.openapi.format("date-time", DATE_TIMES)
    return schemathesis.openapi.from_url(f"{apps.api_url}/openapi.json")


def operations(schema) -> list:
    # The event stream never ends by design: it has tests of its own.
    found = [
        op
        for op in (result.ok() for result in schema.get_all_operations())
        if op.path != "/api/v1/events/stream"
    ]
    assert len(found) >= 8, "the schema lost operations"
    return found


def test_api_holds_its_schema(schema) -> None:
    failures: dict[str, str] = {}
    for operation in operations(schema):
        strategies = [operation.as_strategy()]
        if any(True for _ in operation.iter_parameters()):
            strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=st.one_of(strategies))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION * len(strategies),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case) -> None:
            case.call_and_validate(**CALL)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def test_every_read_takes_extreme_values(schema, api: httpx.Client, device: Device) -> None:
    """Each query parameter of each read, one at a time, given each extreme value, on a device
    with heartbeats at the limits of what a metric may hold."""
    for big in (1e308, 1.7976931348623157e308, -1.7976931348623157e308, MAX_INT, -MAX_INT):
        response = api.post(
            f"/api/v1/devices/{device.device_id}/heartbeats",
            json={"big": big},
            headers={"Authorization": f"Bearer {device.token}"},
        )
        assert response.status_code == 202, response.text
    poll(lambda: len(history(api, device.device_id)) == 5, what="5 heartbeats stored")
    failures: list[str] = []
    tried = 0
    for operation in operations(schema):
        if operation.method.upper() != "GET":
            continue
        names = [p.name for p in operation.iter_parameters() if p.location.value == "query"]
        path = {"device_id": device.device_id} if "{device_id}" in operation.path else None
        for name in names:
            for value in EXTREME_VALUES:
                query = {**REQUIRED.get(operation.path, {}), name: value}
                case = operation.Case(path_parameters=path, query=query)
                tried += 1
                try:
                    case.call_and_validate(**CALL)
                except Exception as exc:
                    failures.append(f"{operation.label} {query!r}:\n{str(exc)[:500]}")
    assert tried > 300
    assert not failures, "\n\n".join(failures[:20])


def test_the_inputs_that_once_gave_a_500(api: httpx.Client, device: Device) -> None:
    """Two heartbeats {"big": 1e308}, then their average (a float8 sum overflowed); the
    history since the year 1 (a partition bound before the year 1 overflowed)."""
    for _ in range(2):
        response = api.post(
            f"/api/v1/devices/{device.device_id}/heartbeats",
            json={"big": 1e308},
            headers={"Authorization": f"Bearer {device.token}"},
        )
        assert response.status_code == 202, response.text
    poll(lambda: len(history(api, device.device_id)) == 2, what="2 heartbeats stored")
    average = api.get(
        f"/api/v1/devices/{device.device_id}/metrics",
        params={"name": "big", "agg": "avg", "bucket": "99999d"},  # one bucket
    )
    assert average.status_code == 200, average.text
    assert [p["value"] for p in average.json()["series"]["big"]] == [1e308]
    since = api.get(
        f"/api/v1/devices/{device.device_id}/heartbeats",
        params={"since": "0001-01-01T00:00:00Z"},
    )
    assert since.status_code == 200, since.text
    assert len(since.json()["items"]) == 2


HEARTBEATS = "/api/v1/devices/{device_id}/heartbeats"
#: What a device with its own token may get for a body while the broker is up.
BODY_ANSWERS = {202, 413, 415, 422}
#: Bodies over the 16 KiB limit, of a few sizes.
oversized = st.integers(MAX_PAYLOAD_BYTES + 1, MAX_PAYLOAD_BYTES + 4096).map(
    lambda n: b'{"x": "' + b"y" * (n - 10) + b'"}'
)


def test_the_heartbeat_route_with_a_devices_own_token(
    schema, apps: LocalStack, register, engine: Engine
) -> None:
    """Bodies generated from the documented schema (positive and negative), the hostile
    payloads of the property tests, heartbeats valid at every extreme, and oversized ones, all
    sent by a registered device to its own route: no 5xx, only 202, 413, 415 or 422, every
    202's heartbeat stored under the id it answered, every refused body a dead letter."""
    device: Device = register("fuzzed")
    operation = schema[HEARTBEATS]["POST"]
    answered: list[tuple[int, bytes]] = []
    accepted: set[str] = set()

    def note(status: int, body: bytes, answer: httpx.Response | object) -> None:
        assert status in BODY_ANSWERS, (status, body[:200])
        answered.append((status, body))
        if status == 202:
            accepted.add(answer.json()["id"])

    @given(case=st.one_of(operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE)))
    @settings(
        max_examples=2 * EXAMPLES_PER_OPERATION * 2,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def from_the_schema(case) -> None:
        # Its own id and token: a negative case may have changed either, which is the
        # route's 401, 403 or 422 before the body is read.
        case.path_parameters = {"device_id": device.device_id}
        case.headers = {**(case.headers or {}), **device.auth}
        response = case.call(timeout=15)
        # Auth is not under test here (tests/e2e/test_access.py has it): the case's own was
        # replaced, which `ignored_auth` would take for an invalid one accepted.
        excluded = [positive_data_acceptance, negative_data_rejection, ignored_auth]
        case.validate_response(response, excluded_checks=excluded)
        note(response.status_code, response.request.body or b"", response)

    url = f"{apps.api_url}/api/v1/devices/{device.device_id}/heartbeats"

    @given(body=payloads() | valid_payloads().map(lambda b: json.dumps(b).encode()) | oversized)
    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def hostile(body: bytes) -> None:
        headers = {**device.auth, "Content-Type": "application/json"}
        response = httpx.post(url, content=body, headers=headers, timeout=15)
        assert response.json()["id" if response.status_code == 202 else "detail"]
        note(response.status_code, body, response)

    from_the_schema()
    hostile()
    statuses = Counter(status for status, _ in answered)
    assert statuses.keys() == BODY_ANSWERS, statuses  # each kind of answer was reached

    def stored_ids() -> set[str]:
        with engine.connect() as conn:
            rows = conn.execute(
                select(heartbeats.c.id).where(heartbeats.c.device_id == device.device_id)
            ).scalars()
            return {str(r) for r in rows}

    poll(lambda: accepted <= stored_ids(), timeout=60, what="every accepted heartbeat stored")
    assert stored_ids() == accepted

    # What a dead letter keeps of a body: its first 64 KiB; nothing of one whose declared
    # size is over the limit (refused before it is read).
    refused = Counter(
        b"" if len(body) > MAX_PAYLOAD_BYTES else body[:MAX_REJECTED_BYTES]
        for status, body in answered
        if status != 202
    )

    def dead_letters() -> Counter:
        with engine.connect() as conn:
            rows = conn.execute(
                select(rejected.c.payload).where(
                    rejected.c.device_id == device.device_id, rejected.c.source == "http"
                )
            ).scalars()
            return Counter(bytes(r) for r in rows)

    dead = poll(
        lambda: (d := dead_letters()).total() >= refused.total() and d,
        timeout=60,
        what=f"{refused.total()} dead letters",
    )
    assert dead == refused
