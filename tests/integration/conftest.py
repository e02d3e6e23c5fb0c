"""Integration tests: one part of the gateway (a bridge or worker in process, the SQL of storage)
against the real RabbitMQ, PostgreSQL and Redis of the test stack."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)
