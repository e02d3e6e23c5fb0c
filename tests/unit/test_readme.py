"""The README is the front door: it must stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.runtime.settings import ApiSettings, BridgeSettings, CommonSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_two_commands_come_first() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block


def test_every_setting_is_documented() -> None:
    names = {
        f"GATEWAY_{field.upper()}"
        for cls in (CommonSettings, BridgeSettings, WorkerSettings, ApiSettings)
        for field in cls.model_fields
    }
    documented = set(re.findall(r"`(GATEWAY_[A-Z0-9_]+)`", README))
    assert names - documented == set(), "settings missing from the README"
    assert documented - names - {"GATEWAY_TEST_KEEP_STACK"} == set(), (
        "README names unknown settings"
    )


def test_the_device_example_is_the_one_the_tests_run() -> None:
    example = (ROOT / "examples" / "paho_device.py").read_text().strip()
    assert example in README


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line.startswith("make")] == ["make test"]


def test_every_documented_default_is_the_codes() -> None:
    """The settings table's defaults: `value` is the field's default as written, `(none)` no
    value; `(the api host)` says what an unset field falls back to."""
    defaults = {
        f"GATEWAY_{name.upper()}": field.default
        for cls in (CommonSettings, BridgeSettings, WorkerSettings, ApiSettings)
        for name, field in cls.model_fields.items()
    }
    rows = re.findall(r"^\| (`GATEWAY_[^|]+) \| ([^|]+) \| [^|]+ \|$", README, re.M)
    checked = 0
    for names, shown in rows:
        names = re.findall(r"`(GATEWAY_[A-Z0-9_]+)`", names)
        values = [v.strip() for v in shown.split(",")] if "`" in shown else [shown.strip()]
        for name, value in zip(
            names, values * len(names) if len(values) == 1 else values, strict=True
        ):
            if value == "(none)":
                assert defaults[name] in (None, ""), (name, defaults[name])
            elif value.startswith("`"):
                assert str(defaults[name]) == value.strip("`"), (name, defaults[name], value)
            else:
                assert value == "(the api host)" and defaults[name] is None, (name, value)
            checked += 1
    assert checked == len(defaults), (checked, len(defaults))


def test_the_make_targets_the_docs_name_exist_and_lint_runs_ruff() -> None:
    import subprocess

    makefile = (ROOT / "Makefile").read_text()
    docs = README + (ROOT / "docs" / "operations.md").read_text()
    named = set(re.findall(r"(?:`|^)make ([a-z-]+)", docs, re.M))
    assert named >= {"run", "test", "up", "down", "status", "lint", "compose-env", "bench"}
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    assert named <= targets, named - targets
    lint = subprocess.run(
        ["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "ruff check ." in lint and "ruff format --check ." in lint


def test_compose_env_writes_random_private_secrets_and_never_overwrites(tmp_path: Path) -> None:
    import stat
    import subprocess

    def compose_env() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-f", str(ROOT / "Makefile"), "compose-env"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )

    assert compose_env().returncode == 0
    env = tmp_path / ".env"
    values = dict(line.split("=", 1) for line in env.read_text().splitlines())
    assert len(values) == 7 and all(name.startswith("GATEWAY_") for name in values)
    assert len(set(values.values())) == 7 and all(len(v) >= 40 for v in values.values())
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    before = env.read_text()
    again = compose_env()
    assert again.returncode != 0 and "keep it" in again.stdout
    assert env.read_text() == before


def test_every_test_the_claims_table_names_exists() -> None:
    """docs/claims.md names the test that proves each claim: each must be there, so that a
    renamed or removed test cannot leave a claim unproven without this failing."""
    import ast

    claims = (ROOT / "docs" / "claims.md").read_text()
    named = re.findall(
        r"`((?:unit|integration|e2e|fault)/test_[a-z0-9_]+\.py)::([A-Za-z0-9_]+)`", claims
    )
    assert len(named) > 200, len(named)
    missing = []
    for filename, name in set(named):
        path = ROOT / "tests" / filename
        tree = ast.parse(path.read_text()) if path.exists() else ast.Module(body=[])
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        if name not in defined:
            missing.append(f"{filename}::{name}")
    assert not missing, sorted(missing)
    assert "(../README.md)" in claims
    assert "[claims.md](claims.md)" in (ROOT / "docs" / "guarantees.md").read_text()
