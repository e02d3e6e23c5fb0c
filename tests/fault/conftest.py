"""Fault tests: real processes of the test stack killed, stopped and cut off under load; every
acknowledged heartbeat must be stored exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.fault)
