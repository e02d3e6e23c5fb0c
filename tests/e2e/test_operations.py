"""What docs/operations.md says about running and watching the gateway, checked against the
code and the running test stack: the local ports, what listens where, the metrics operators
are told to watch, readiness without Redis, the commands' defaults, logs, simulated fleets."""

from __future__ import annotations

import io
import json
import logging
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select
from support import poll, unique

from gateway.amqp import sessions
from gateway.cli import stack as stack_cli
from gateway.devtools.localstack import DEV_PORTS, LocalStack, StackError, config_lines
from gateway.devtools.localstack import require_system_packages as require
from gateway.runtime import logs, metrics
from gateway.storage.schema import heartbeats

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
SECURITY = (ROOT / "docs" / "security.md").read_text()
GATEWAY = str(Path(sys.executable).parent / "gateway")


# ---- the local stack ------------------------------------------------------------------------


def doc_ports(doc: str) -> dict[str, int]:
    """The port table of the local stack: `| what / what | 1 / 2 |` rows, by what."""
    found = {}
    for names, numbers in re.findall(r"^\| ([^|]+?) \| ([\d /]+) \|$", doc, re.M):
        for name, number in zip(names.split(" / "), numbers.split(" / "), strict=True):
            found[name.split(" (")[0].strip()] = int(number)
    return found


def test_the_documented_local_ports_are_the_stacks() -> None:
    ports = doc_ports(OPERATIONS)
    p = DEV_PORTS
    assert ports == {
        "MQTT": p.mqtt,
        "MQTT over TLS": p.mqtt_tls,
        "MQTT over WebSocket with TLS": p.web_mqtt_tls,
        "API": p.api,
        "over HTTPS": p.api_tls,
        "RabbitMQ AMQP": p.amqp,
        "management": p.management,
        "Prometheus": p.prometheus,
        "Erlang distribution": p.dist,
        "PostgreSQL": p.postgres,
        "Redis": p.redis,
        "api internal listener": p.api_internal,
        "bridge": p.bridge_health,
        "worker health and metrics": p.worker_health,
    }


def listening(port: int) -> set[str]:
    """The addresses a TCP socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # LISTEN
                addresses.add(address)
    return addresses


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


@pytest.mark.e2e
def test_the_local_stack_listens_on_loopback_only(apps: LocalStack) -> None:
    """Nothing of the local stack is reachable from another host: the broker (every
    listener), PostgreSQL, Redis, the api and the services' health ports."""
    for name, port in vars(apps.ports).items():
        addresses = listening(port)
        assert addresses, f"nothing listens on {name} ({port})"
        assert addresses <= LOOPBACK, f"{name} ({port}) listens on {addresses}"


@pytest.mark.e2e
def test_rabbitmq_serves_its_own_prometheus_metrics(apps: LocalStack) -> None:
    text = httpx.get(f"http://127.0.0.1:{apps.ports.prometheus}/metrics", timeout=10).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"rabbitmq_queue_messages_ready", "rabbitmq_connections"} <= names


def test_the_operator_token_is_generated_once_and_private(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("GATEWAY_OPERATOR_TOKEN", raising=False)
    stack = LocalStack("dev", DEV_PORTS, root=tmp_path)
    token = stack.operator_token()
    path = stack.run_dir / "operator-token"
    assert path.read_text().strip() == token and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert LocalStack("dev", DEV_PORTS, root=tmp_path).operator_token() == token
    monkeypatch.setenv("GATEWAY_OPERATOR_TOKEN", "given-by-the-operator-0123")
    assert stack.operator_token() == "given-by-the-operator-0123"


def test_gateway_commands_default_to_the_local_stack(tmp_path: Path, monkeypatch) -> None:
    """Without GATEWAY_*_URL, and with the local stack's secrets present, `gateway` commands
    use the local stack's connections; a URL given wins."""
    stack = LocalStack("dev", DEV_PORTS, root=tmp_path)
    (stack.run_dir / "secrets").mkdir(parents=True)
    monkeypatch.setattr(LocalStack, "dev", classmethod(lambda cls: stack))
    for name in ("DATABASE", "AMQP", "REDIS", "BROKER_MANAGEMENT"):
        monkeypatch.delenv(f"GATEWAY_{name}_URL", raising=False)
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://elsewhere:6379/0")
    stack_cli.local_stack_defaults()
    import os

    assert os.environ["GATEWAY_DATABASE_URL"] == stack.database_url
    assert os.environ["GATEWAY_AMQP_URL"] == stack.amqp_url_for("gateway-api")
    assert os.environ["GATEWAY_BROKER_MANAGEMENT_URL"] == stack.management_api_url
    assert os.environ["GATEWAY_REDIS_URL"] == "redis://elsewhere:6379/0"


def test_missing_packages_are_named_with_the_command_that_installs_them(monkeypatch) -> None:
    """Not root: nothing is installed, the message says what to install and how."""
    monkeypatch.setattr(
        "gateway.devtools.localstack.base.have", lambda command: command != "redis-server"
    )
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    packages = {"rabbitmq-server": "rabbitmq-server", "redis-server": "redis-server"}
    with pytest.raises(StackError) as refused:
        require(packages)
    assert "sudo apt-get install -y redis-server" in str(refused.value)


def test_permission_checks_are_cached_for_60_s_and_logins_never() -> None:
    """`auth_cache` caches the http backend's answers for 60 s; RabbitMQ's cache never holds
    a login (user_login_authentication), so a rotated token fails at the next connect."""
    config = config_lines((ROOT / "rabbitmq" / "rabbitmq.conf").read_text())
    assert config["auth_cache.cached_backend"] == "http"
    assert config["auth_cache.cache_ttl"] == "60000"


# ---- watching -------------------------------------------------------------------------------


def exposed(port: int) -> set[str]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name, f"{family.name}_total", *(s.name for s in family.samples)}
    return names


@pytest.mark.e2e
def test_every_metric_the_docs_name_is_exposed(apps: LocalStack) -> None:
    named = set(re.findall(r"`(gateway_[a-z_]+)", OPERATIONS + SECURITY))
    assert len(named) >= 12, named
    by_service = {name: exposed(apps.health_port(name)) for name in ("api", "bridge", "worker")}
    missing = named - set().union(*by_service.values())
    assert not missing, missing
    assert {"gateway_queue_depth_messages", "gateway_sweeper_leader"} <= by_service["worker"]
    assert "gateway_receive_to_commit_seconds" in by_service["worker"]


@pytest.mark.e2e
def test_redis_is_reported_by_readyz_but_not_needed(apps: LocalStack) -> None:
    """With Redis stopped the api and the worker stay ready and say Redis is down; the bridge
    does not use Redis at all."""
    apps.stop_redis()
    try:
        for name in ("api", "worker"):
            port = apps.health_port(name)

            def without_redis(port: int = port) -> dict | None:
                body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
                return body if body["checks"].get("redis") is False else None

            body = poll(without_redis, what=f"{name} to report Redis down")
            assert body["ready"] is True, (name, body)
        bridge = httpx.get(f"http://127.0.0.1:{apps.ports.bridge_health}/readyz").json()
        assert bridge["ready"] is True and "redis" not in bridge["checks"], bridge
    finally:
        apps.start_redis()
        poll(apps.redis_ready, what="Redis back")


def test_logs_are_one_json_object_per_line_with_the_request_id() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger(unique("test.logs"))
    log.addHandler(handler)
    log.propagate = False
    log.warning("stored %d of %s", 3, "pump-7")
    with logs.request_scope("trace-7"):
        log.warning("second\nline")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["level"], first["msg"]) == ("warning", "stored 3 of pump-7")
    assert "request_id" not in first
    assert (second["msg"], second["request_id"]) == ("second\nline", "trace-7")


def test_a_connection_that_cannot_be_closed_is_logged_and_counted(caplog) -> None:
    before = metrics.SESSION_CLOSE_FAILURES._value.get()
    with caplog.at_level(logging.WARNING, logger="gateway.amqp.sessions"):
        assert not sessions.close_sessions("http://gateway:secret@127.0.0.1:9/", "pump-7")
        assert not sessions.close_sessions(None, "pump-8")
    assert metrics.SESSION_CLOSE_FAILURES._value.get() == before + 2
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "open connections of pump-7 may remain (its next logins are refused)",
        "open connections of pump-8 may remain (its next logins are refused)",
    ]
    assert "secret" not in caplog.text


# ---- simulated devices --------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("transport", ["--mqtt", "--http"])
def test_gateway_simulate_registers_its_devices_and_they_are_stored(
    apps: LocalStack, engine: Engine, transport: str
) -> None:
    prefix = unique("sim")
    done = subprocess.run(
        [
            GATEWAY,
            "simulate",
            "--devices",
            "3",
            "--interval",
            "0.5",
            "--duration",
            "3",
            "--prefix",
            prefix,
            transport,
            "--mqtt-port",
            str(apps.ports.mqtt),
            "--api-url",
            apps.api_url,
        ],
        env=apps.env("api"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.splitlines()[-1]
    found = re.match(r"sent (\d+), acknowledged (\d+) .*refused 0, errors 0", summary)
    assert found, summary
    sent, acked = map(int, found.groups())
    assert acked > 0 and acked <= sent
    ids = [f"{prefix}-{i:04d}" for i in (1, 2, 3)]

    def stored() -> int:
        with engine.connect() as conn:
            return conn.scalar(
                select(func.count()).select_from(heartbeats).where(heartbeats.c.device_id.in_(ids))
            )

    poll(lambda: stored() >= acked, what="the acknowledged heartbeats stored")
    assert stored() <= sent


# ---- link quality -------------------------------------------------------------------------


def test_a_counter_that_goes_back_starts_a_new_run() -> None:
    """A device that restarted counts from 0 again: its old run and its new one are counted
    apart, so the restart is not taken for losses."""
    from datetime import UTC, datetime, timedelta

    from gateway.storage.quality import WINDOW, compute

    t0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    seqs = [7, 8, 9, 11, 0, 1, 2, 4]  # 10 lost, a restart, 3 lost
    rows = [(seq, None, t0 + timedelta(seconds=i)) for i, seq in enumerate(seqs)]
    quality = compute(rows, WINDOW)
    assert (quality.received, quality.expected) == (8, 5 + 5)
    assert quality.loss_pct == 20.0
    assert quality.median_interval_s == 1.0 and quality.clock_skew_s is None
