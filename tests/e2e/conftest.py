"""End-to-end tests: the real bridge, worker and api processes of the test stack, driven as devices
and operators drive them (MQTT clients, HTTP, the `gateway` command)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
