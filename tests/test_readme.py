"""The README is the front door: it must stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.settings import ApiSettings, BridgeSettings, CommonSettings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
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
