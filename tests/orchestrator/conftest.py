from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.orchestrator import sagas


@pytest.fixture(autouse=True)
def _script() -> Iterator[None]:
    sagas.CALLS.clear()
    sagas.SCRIPT.clear()
    sagas.PLAN.clear()
    yield
    sagas.SCRIPT.clear()
    sagas.PLAN.clear()
