"""The saga orchestrator: durable, compensating, idempotent sagas defined in Python.

Public API (docs/orchestrator.md)::

    from orchestrator import RetryPolicy, Step, StepFailed, saga_define, saga_start
"""

from __future__ import annotations

from typing import Any

from orchestrator.definitions import RetryPolicy, Step, StepFailed, saga_define

__all__ = ["RetryPolicy", "Step", "StepFailed", "saga_define", "saga_start"]


def saga_start(*, saga_type: str, saga_id: str, data: dict[str, Any] | None = None) -> Any:
    from orchestrator.engine import saga_start as start

    return start(saga_type=saga_type, saga_id=saga_id, data=data)
