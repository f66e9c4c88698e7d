"""The saga types bench/orchestrator.py runs (imported by its worker processes)."""

from __future__ import annotations

from typing import Any

from orchestrator import RetryPolicy, Step, StepFailed, saga_define

STEPS = ("create_order", "charge_payment", "reserve_stock", "create_shipment")
ONCE = RetryPolicy(max_attempts=1)


def nothing(ctx: Any) -> None:
    return None


def refuse(ctx: Any) -> None:
    raise StepFailed("no carrier", type="NoCarrier", retryable=False)


saga_define(
    "bench-ok",
    service="bench",
    steps=[Step(name, action=nothing, compensation=nothing, retry=ONCE) for name in STEPS],
)
saga_define(
    "bench-fail",  # the last step fails: three compensations run
    service="bench",
    steps=[
        *(Step(name, action=nothing, compensation=nothing, retry=ONCE) for name in STEPS[:3]),
        Step(STEPS[3], action=refuse, retry=ONCE),
    ],
)
