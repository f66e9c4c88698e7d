"""The orchestrator's transitions on one worker: success, retries, compensation, reporting."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.engine import StartRefused, saga_start
from orchestrator.models import SagaRun, StepRun
from orchestrator.worker import Worker
from outbox.models import OutboxMessage
from tests.orchestrator import sagas
from tests.orchestrator.sagas import ORDER_STEPS
from tracking.models import Saga, TelemetryEvent

pytestmark = pytest.mark.django_db


def effects(saga_id: str) -> list[tuple[str, str]]:
    return [
        (p["phase"], p["step"])
        for p in (
            json.loads(m.payload)
            for m in OutboxMessage.objects.filter(type="test.effect", aggregateid=saga_id).order_by(
                "seq"
            )
        )
    ]


def timeline(saga_id: str) -> list[tuple[str, str]]:
    return list(
        TelemetryEvent.objects.filter(saga_id=saga_id)
        .order_by("sequence")
        .values_list("type", "step")
    )


def test_a_saga_runs_its_steps_in_order_and_is_reported_like_any_other() -> None:
    saga_start(saga_type="test-order", saga_id="o-1", data={"order_id": 7, "items": [1, 2]})

    Worker().drain()

    run = SagaRun.objects.get(saga_id="o-1")
    assert run.status == "completed" and run.next_run_at is None
    assert [s.status for s in run.steps.all()] == ["succeeded"] * 4
    assert run.results["charge_payment"] == {"done": "charge_payment", "attempt": 1}
    assert effects("o-1") == [("forward", s) for s in ORDER_STEPS]
    assert timeline("o-1") == [
        ("saga.started", ""),
        *[(t, s) for s in ORDER_STEPS for t in ("step.started", "step.succeeded")],
        ("saga.completed", ""),
    ]
    saga = Saga.objects.get(saga_id="o-1")  # the same read model as reported sagas
    assert (saga.status, saga.saga_type, saga.attributes) == (
        "completed",
        "test-order",
        {"order_id": 7},
    )
    assert saga.services == ",order,"


def test_start_is_idempotent_on_the_saga_id() -> None:
    first = saga_start(saga_type="test-order", saga_id="o-2", data={"n": 1})
    again = saga_start(saga_type="test-order", saga_id="o-2", data={"n": 2})
    assert again.pk == first.pk and again.data == {"n": 1}
    assert SagaRun.objects.count() == 1 and StepRun.objects.count() == 4
    with pytest.raises(StartRefused, match="saga_id: already used by a saga of type test-order"):
        from orchestrator.definitions import Step, saga_define

        saga_define("other", steps=[Step("x", action=sagas.do)])
        saga_start(saga_type="other", saga_id="o-2")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"saga_id": ""}, "saga_id"),
        ({"saga_id": "x" * 201}, "saga_id"),
        ({"saga_id": "ok", "data": [1]}, "data"),
        ({"saga_id": "ok", "data": {"when": object()}}, "data"),
    ],
)
def test_bad_starts_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(StartRefused) as caught:
        saga_start(saga_type="test-order", **kwargs)
    assert caught.value.field == field
    assert SagaRun.objects.count() == 0


def test_a_failed_attempt_is_retried_and_its_writes_roll_back() -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail", "fail"]
    saga_start(saga_type="test-order", saga_id="o-3")

    Worker().drain()

    run = SagaRun.objects.get(saga_id="o-3")
    assert run.status == "completed"
    charge = run.steps.get(name="charge_payment")
    assert charge.attempt == 3
    assert sagas.CALLS["forward:charge_payment"] == 3
    assert effects("o-3").count(("forward", "charge_payment")) == 1  # only the one that worked
    failed = TelemetryEvent.objects.filter(saga_id="o-3", type="step.failed")
    assert [
        (e.attempt, e.error["type"], e.error["retryable"]) for e in failed.order_by("sequence")
    ] == [
        (1, "ConnectionError", True),
        (2, "ConnectionError", True),
    ]


def test_a_step_that_fails_for_good_compensates_the_completed_ones_in_reverse() -> None:
    sagas.SCRIPT["forward:reserve_stock"] = ["fatal"]
    saga_start(saga_type="test-order", saga_id="o-4")

    Worker().drain()

    run = SagaRun.objects.get(saga_id="o-4")
    assert run.status == "compensated"
    assert effects("o-4") == [
        ("forward", "create_order"),
        ("forward", "charge_payment"),
        ("compensation", "charge_payment"),
        ("compensation", "create_order"),
    ]
    assert [s.status for s in run.steps.all()] == [
        "compensated",
        "compensated",
        "failed",
        "pending",
    ]
    assert timeline("o-4")[-6:] == [
        ("saga.compensating", ""),
        ("compensation.started", "charge_payment"),
        ("compensation.succeeded", "charge_payment"),
        ("compensation.started", "create_order"),
        ("compensation.succeeded", "create_order"),
        ("saga.compensated", ""),
    ]
    assert Saga.objects.get(saga_id="o-4").status == "compensated"


def test_a_compensation_that_fails_for_good_ends_compensation_failed_and_the_detector_sees_it() -> (
    None
):
    from tracking.detector import detect_pass
    from tracking.models import Incident

    sagas.SCRIPT["forward:create_shipment"] = ["fatal"]
    sagas.SCRIPT["compensation:charge_payment"] = ["fail", "fail", "fail"]
    saga_start(saga_type="test-order", saga_id="o-5")

    Worker().drain()

    run = SagaRun.objects.get(saga_id="o-5")
    assert run.status == "compensation_failed"
    charge = run.steps.get(name="charge_payment")
    assert (charge.status, charge.compensation_attempt) == ("compensation_failed", 3)
    # reserve_stock was undone before; create_order is left for an operator
    assert effects("o-5") == [
        *[("forward", s) for s in ORDER_STEPS[:3]],
        ("compensation", "reserve_stock"),
    ]
    assert Saga.objects.get(saga_id="o-5").status == "compensation_failed"
    detect_pass()
    assert list(Incident.objects.values_list("kind", "step")) == [
        ("compensation_failed", "charge_payment")
    ]


def test_nothing_to_undo_ends_failed() -> None:
    sagas.SCRIPT["forward:create_order"] = ["fatal"]
    saga_start(saga_type="test-order", saga_id="o-6")
    Worker().drain()
    run = SagaRun.objects.get(saga_id="o-6")
    assert run.status == "failed"
    assert run.last_error["type"] == "Refused" and run.last_error["step"] == "create_order"
    assert timeline("o-6")[-1] == ("saga.failed", "")
