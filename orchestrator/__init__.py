"""The saga orchestrator: durable, compensating, idempotent sagas defined in Python.

Public API (docs/orchestrator.md)::

    from orchestrator import RetryPolicy, Step, StepFailed, saga_define, saga_start, sagas_start
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from orchestrator.definitions import RetryPolicy, Step, StepFailed, saga_define

__all__ = ["RetryPolicy", "Step", "StepFailed", "saga_define", "saga_start", "sagas_start"]


def saga_start(*, saga_type: str, saga_id: str, data: dict[str, Any] | None = None) -> Any:
    from orchestrator.engine import saga_start as start

    return start(saga_type=saga_type, saga_id=saga_id, data=data)


def sagas_start(*, saga_type: str, sagas: Iterable[tuple[str, dict[str, Any] | None]]) -> Any:
    from orchestrator.engine import sagas_start as start

    return start(saga_type=saga_type, sagas=sagas)
