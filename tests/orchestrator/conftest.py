from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _script(test_sagas: object) -> None:
    """Every orchestrator test starts with fresh scripts (see tests/conftest.py)."""
