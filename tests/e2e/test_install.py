"""The runtime install on its own: `pip install .` without extras, into a fresh virtualenv (as
the Docker image does), runs every `gateway` subcommand a deployment needs, and the services
import. The simulator's and the tests' dependencies live in extras and are absent here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.devtools.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh virtualenv holding the project without extras."""
    base = tmp_path_factory.mktemp("runtime")
    # What the Dockerfile copies, built outside the checkout (setuptools writes `build/` and
    # `*.egg-info` next to the sources it builds).
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("gateway", "api", "bridge", "worker"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(source),
        ],
        check=True,
        timeout=600,
    )
    return venv / "bin"


def run(bin_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=bin_dir,  # not the checkout: the sources there must not stand in for the install
        env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root"), **(env or {})},
    )
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stderr[-2000:]}"
    return result.stdout


def test_the_extras_are_not_installed(runtime: Path) -> None:
    for module in ("httpx", "pytest", "hypothesis"):
        probe = subprocess.run([str(runtime / "python"), "-c", f"import {module}"], cwd=runtime)
        assert probe.returncode != 0, f"{module} is installed without extras"


def test_every_subcommand_answers_help(runtime: Path) -> None:
    top = run(runtime, "gateway", "--help")
    for command in ("stack", "devices", "rejected", "simulate", "migrate", "maintain", "tls"):
        assert command in top
        run(runtime, "gateway", command, "--help")
    assert run(runtime, "python", "-m", "gateway", "--version").startswith("gateway ")


def test_definitions_and_tls_init_run(runtime: Path, tmp_path: Path) -> None:
    definitions = json.loads(run(runtime, "gateway", "definitions"))
    assert {q["name"] for q in definitions["queues"]} >= {"gateway.heartbeats"}
    out = run(runtime, "gateway", "tls", "init", "--out", str(tmp_path), "--host", "gw.example")
    assert "gw.example" in out
    assert (tmp_path / "server.pem").exists()


def test_the_services_import(runtime: Path) -> None:
    run(runtime, "python", "-c", "import api.main, bridge.main, worker.main")


def test_simulate_without_its_extra_says_what_to_install(runtime: Path) -> None:
    result = subprocess.run(
        [str(runtime / "gateway"), "simulate", "--devices", "1"],
        capture_output=True,
        text=True,
        cwd=runtime,
        env={
            "PATH": str(runtime),
            "GATEWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        },
    )
    assert result.returncode == 2, result.stderr
    assert "heartbeat-gateway[simulate]" in result.stderr


def test_migrate_runs_from_the_installed_migrations(runtime: Path, stack: LocalStack) -> None:
    """The migrations ship as package data: the install applies them (here to a database at
    head already, so it has nothing to do but must find every revision)."""
    out = run(runtime, "gateway", "migrate", env={"GATEWAY_DATABASE_URL": stack.database_url})
    assert "up to date" in out
