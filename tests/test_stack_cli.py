"""The local stack's commands, as `make up` and `make status` run them (`gateway stack up|status`,
here on the test stack): `up` is idempotent (a stack that runs is left as it is) and prints
where everything listens and the operator token; `status` shows what runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.localstack import LocalStack

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(sys.executable).parent / "gateway")


def gateway_stack(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GATEWAY, "stack", action, "--name", "test"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_up_again_starts_nothing_and_says_where_everything_listens(apps: LocalStack) -> None:
    before = apps.status()
    assert all(before.values()), before
    done = gateway_stack("up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert apps.status() == before  # the same processes: nothing started twice
    assert all(apps.app_ready(name) for name in ("worker", "bridge", "api"))
    for where in (
        f"127.0.0.1:{apps.ports.mqtt}",
        f"127.0.0.1:{apps.ports.mqtt_tls}",
        f"wss://127.0.0.1:{apps.ports.web_mqtt_tls}/ws",
        apps.api_url,
        apps.api_https_url,
        f"operator token: {apps.operator_token()}",
        str(apps.run_dir / "secrets"),
    ):
        assert where in done.stdout, (where, done.stdout)


def test_status_shows_what_runs(apps: LocalStack) -> None:
    done = gateway_stack("status")
    assert done.returncode == 0, done.stderr
    shown = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert shown == {name: f"running, pid {pid}" for name, pid in apps.status().items()}
