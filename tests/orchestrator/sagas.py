"""Saga definitions the orchestrator tests run.

Actions record their effect as an outbox message of type ``test.effect`` in the
step's transaction (keyed by the idempotency key), so a test counts effects
that really committed; ``CALLS`` counts every call, committed or not.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import outbox
from orchestrator import RetryPolicy, Step, StepFailed, saga_define

CALLS: Counter[str] = Counter()
# Per test: "<phase>:<step>" -> outcomes of successive calls ("ok", "fail", "fatal");
# a worker process started by a test reads it from TEST_SCRIPT.
SCRIPT: dict[str, list[str]] = json.loads(os.environ.get("TEST_SCRIPT", "{}"))
# Outcomes for any call, in order, once SCRIPT has none for its label.
PLAN: list[str] = []

FAST = RetryPolicy(max_attempts=3, backoff_base=0.0, backoff_max=0.0, jitter=0.0)


def _effect(ctx: Any, what: str) -> dict[str, Any]:
    label = f"{ctx.phase}:{ctx.step}"
    CALLS[label] += 1
    plan = SCRIPT.get(label, [])
    outcome = plan.pop(0) if plan else (PLAN.pop(0) if PLAN else "ok")
    if outcome == "fail":
        raise ConnectionError(f"{ctx.step}: the service is away")
    if outcome == "fatal":
        raise StepFailed(f"{ctx.step}: refused", type="Refused", retryable=False)
    outbox.publish(
        topic="test.effects",
        key=ctx.saga_id,
        type="test.effect",
        payload={"what": what, "step": ctx.step, "phase": ctx.phase, "key": ctx.idempotency_key},
    )
    return {"done": ctx.step, "attempt": ctx.attempt}


def do(ctx: Any) -> dict[str, Any]:
    return _effect(ctx, "do")


def undo(ctx: Any) -> dict[str, Any]:
    return _effect(ctx, "undo")


ORDER_STEPS = ("create_order", "charge_payment", "reserve_stock", "create_shipment")

saga_define(
    "test-order",
    service="order",
    steps=[Step(name, action=do, compensation=undo, retry=FAST) for name in ORDER_STEPS],
)


saga_define(
    "test-remote",
    service="order",
    steps=[
        Step("reserve_stock", action=do, compensation=undo, retry=FAST),
        Step(
            "charge_payment",
            kind="remote",
            service="payment",
            command="charge",
            retry=FAST,
            timeout=30,
        ),
        Step("create_shipment", action=do, compensation=undo, retry=FAST),
    ],
)


def prepare(ctx: Any) -> dict[str, Any]:
    return _effect(ctx, "prepare")


def commit(ctx: Any) -> dict[str, Any]:
    return _effect(ctx, "commit")


saga_define(
    "test-tcc",
    service="order",
    steps=[
        Step(
            "hold_seat", kind="tcc", action=prepare, confirm=commit, compensation=undo, retry=FAST
        ),
        Step("charge_card", action=do, compensation=undo, retry=FAST),
    ],
)


saga_define(
    "test-breaker",
    service="order",
    steps=[
        Step(
            "charge_payment",
            kind="remote",
            service="payment",
            command="charge",
            retry=RetryPolicy(max_attempts=10, backoff_base=0.0, jitter=0.0),
            timeout=30,
        ),
    ],
)


SLOW = RetryPolicy(max_attempts=3, backoff_base=60.0, backoff_max=60.0, jitter=0.0)

saga_define(
    "test-slow-retry",
    service="order",
    steps=[
        Step("create_order", action=do, compensation=undo, retry=SLOW),
        Step("charge_payment", action=do, compensation=undo, retry=SLOW),
    ],
)

saga_define(
    "test-hyp",
    service="order",
    steps=[Step(n, action=do, compensation=undo, retry=FAST) for n in ("a", "b", "c")],
)
