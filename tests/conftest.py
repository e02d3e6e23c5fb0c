"""Test harness: real RabbitMQ (with the MQTT plugin), PostgreSQL and Redis.

The harness starts the project's `test` stack (its own ports, see gateway/devtools/localstack) and
stops it at the end if it started it. Integration tests get a RabbitMQ vhost of their own, so
in-process bridges and workers never compete with the stack's processes. A missing service
skips these tests locally, with the reason, and fails them under CI=true.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import fault_report
import httpx
import pytest
import redis
from broker4 import broker_stack_class
from sqlalchemy import Engine
from support import OPERATOR_TOKEN, Device, unavailable, unique

from gateway.amqp import accounts
from gateway.devtools.localstack import LocalStack, StackError
from gateway.storage.engine import make_engine


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """RabbitMQ, PostgreSQL and Redis of the test stack (started if needed)."""
    os.environ["GATEWAY_OPERATOR_TOKEN"] = OPERATOR_TOKEN
    test_stack = broker_stack_class().test()  # GATEWAY_TEST_BROKER: the broker's version
    was_running = test_stack.component("rabbitmq").pid() is not None
    try:
        test_stack.up(apps=False, echo=False)
    except (StackError, OSError) as exc:
        unavailable(f"cannot start the test stack: {exc}")
    yield test_stack
    if not was_running and not os.environ.get("GATEWAY_TEST_KEEP_STACK"):
        test_stack.down(echo=False)


@pytest.fixture(scope="session")
def apps(stack: LocalStack) -> Iterator[LocalStack]:
    """bridge, worker and api processes of the test stack, in its `/` vhost."""
    for name in ("worker", "bridge", "api"):
        stack.stop_app(name)  # fresh processes with this session's settings
        stack.start_app(name)
    try:
        stack.wait_apps()
    except StackError as exc:
        pytest.fail(str(exc))
    yield stack
    for name in ("api", "bridge", "worker"):
        stack.stop_app(name)


@pytest.fixture(scope="session")
def engine(stack: LocalStack) -> Iterator[Engine]:
    eng = make_engine(stack.database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def redis_client(stack: LocalStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.fixture
def vhost(stack: LocalStack) -> Iterator[str]:
    """A fresh, empty RabbitMQ vhost (services declare the topology); yields its AMQP URL."""
    name = unique("test")
    stack.management("PUT", f"/api/vhosts/{name}", {})
    stack.management(
        "PUT",
        f"/api/permissions/{name}/{accounts.ADMIN}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    yield stack.amqp_url_for(accounts.ADMIN, name)
    stack.management("DELETE", f"/api/vhosts/{name}")


@pytest.fixture
def register(api: httpx.Client) -> Callable[..., Device]:
    """Register a device through the API (as an operator would) and return its credentials."""

    def make(prefix: str = "dev", **fields: Any) -> Device:
        device_id = unique(prefix)
        response = api.post("/api/v1/devices", json={"device_id": device_id, **fields})
        assert response.status_code == 201, response.text
        return Device(device_id, response.json()["token"])

    return make


@pytest.fixture
def device(register: Callable[..., Device]) -> Device:
    return register()


@pytest.fixture
def api(apps: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=apps.api_url,
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        timeout=10,
    ) as client:
        yield client


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The reports of this run: one row per injected fault, and liveness detection delays."""
    run_dir = broker_stack_class().test().run_dir
    write = terminalreporter.write_line
    faults = run_dir / "fault-report.json"
    if faults.exists() and faults.stat().st_mtime >= config._gateway_started:
        terminalreporter.section("fault report (`make fault-report` puts it in the docs)")
        for line in fault_report.table(json.loads(faults.read_text())):
            write(line)
    liveness = run_dir / "liveness-report.json"
    if liveness.exists() and liveness.stat().st_mtime >= config._gateway_started:
        terminalreporter.section("liveness detection delays")
        for r in json.loads(liveness.read_text()):
            write(
                f"{r['what']:<58} {r['devices']:>3} devices  p50 {r['p50_s']:.3f} s  "
                f"max {r['max_s']:.3f} s"
            )


def pytest_configure(config) -> None:
    config._gateway_started = time.time()
    for report in ("fault-report.json", "liveness-report.json"):
        (broker_stack_class().test().run_dir / report).unlink(missing_ok=True)
