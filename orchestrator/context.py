"""What a step's action is given: the saga's data, earlier results, the attempt and its key."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


def idempotency_key(saga_id: str, step: str, epoch: int) -> str:
    """Stable across retries of one epoch; a new epoch (an operator's retry) is a new key."""
    key = f"{saga_id}:{step}:{epoch}"
    if len(key) <= 200:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StepContext:
    saga_id: str
    saga_type: str
    step: str
    phase: str  # "forward", "compensation" or "confirm"
    attempt: int
    epoch: int
    idempotency_key: str
    data: Mapping[str, Any]
    results: Mapping[str, Any]  # earlier steps' return values, by step name

    @classmethod
    def build(
        cls,
        *,
        saga_id: str,
        saga_type: str,
        step: str,
        phase: str,
        attempt: int,
        epoch: int,
        data: dict[str, Any],
        results: dict[str, Any],
    ) -> StepContext:
        return cls(
            saga_id=saga_id,
            saga_type=saga_type,
            step=step,
            phase=phase,
            attempt=attempt,
            epoch=epoch,
            idempotency_key=idempotency_key(saga_id, step, epoch),
            data=MappingProxyType(dict(data)),
            results=MappingProxyType(dict(results)),
        )
