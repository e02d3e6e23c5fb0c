"""Unit tests: no service at all (no broker, database or Redis), so `pytest tests/unit` runs in
seconds anywhere. Asking for the stack here is a mistake this conftest turns into a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def stack() -> None:
    pytest.fail(
        "a unit test asked for the test stack: it belongs in tests/integration or tests/e2e"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.unit)
