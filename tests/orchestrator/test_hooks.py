"""Operator hooks: each checks state and version, changes the run once, and workers carry it out."""

from __future__ import annotations

import json

import pytest

from orchestrator.engine import saga_start, step_reply
from orchestrator.hooks import (
    Conflict,
    Refused,
    run_compensate,
    run_pause,
    run_rerun_from,
    run_resume,
    run_retry_compensation,
    run_retry_step,
    run_skip_step,
    run_terminate,
)
from orchestrator.models import SagaRun, StepRun
from orchestrator.worker import Worker
from outbox.models import OutboxMessage
from tests.orchestrator import sagas
from tracking.models import Saga

pytestmark = pytest.mark.django_db


def effect_keys(saga_id: str) -> list[tuple[str, str]]:
    return [
        (p["phase"], p["key"])
        for p in (
            json.loads(m.payload)
            for m in OutboxMessage.objects.filter(type="test.effect", aggregateid=saga_id).order_by(
                "seq"
            )
        )
    ]


def run(saga_id: str) -> SagaRun:
    return SagaRun.objects.get(saga_id=saga_id)


def test_retry_step_runs_a_waiting_step_now_in_a_new_epoch() -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="h-1")
    Worker().drain()
    assert run("h-1").waiting.startswith("retry 2 of charge_payment at")  # a minute away

    result = run_retry_step(saga_id="h-1", expected_version=run("h-1").version)
    Worker().drain()

    assert run("h-1").status == "completed" and run("h-1").epoch == 2
    assert result.version < run("h-1").version
    assert effect_keys("h-1") == [
        ("forward", "h-1:create_order:1"),
        ("forward", "h-1:charge_payment:2"),  # a new idempotency key
    ]
    step = StepRun.objects.get(run__saga_id="h-1", name="charge_payment")
    assert (step.attempt, step.attempt_base) == (2, 1)  # numbers go on, the budget restarted


def test_a_stale_version_is_a_conflict_so_a_double_click_acts_once() -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="h-2")
    Worker().drain()
    seen = run("h-2").version
    run_retry_step(saga_id="h-2", expected_version=seen)
    with pytest.raises(Conflict, match="changed since you looked"):
        run_retry_step(saga_id="h-2", expected_version=seen)
    assert run("h-2").epoch == 2


def test_hooks_refuse_with_a_reason_in_the_wrong_state() -> None:
    saga_start(saga_type="test-order", saga_id="h-3")
    Worker().drain()
    with pytest.raises(Refused, match="cannot retry a step of a saga that is completed"):
        run_retry_step(saga_id="h-3")
    with pytest.raises(Refused, match="the saga is completed already"):
        run_terminate(saga_id="h-3")
    with pytest.raises(Refused, match="no orchestrated saga nope") as caught:
        run_pause(saga_id="nope")
    assert caught.value.field == "saga_id"
    assert run("h-3").status == "completed"


def test_retry_compensation_after_it_failed_for_good() -> None:
    sagas.SCRIPT["forward:reserve_stock"] = ["fatal"]
    sagas.SCRIPT["compensation:charge_payment"] = ["fail", "fail", "fail"]
    saga_start(saga_type="test-order", saga_id="h-4")
    Worker().drain()
    assert run("h-4").status == "compensation_failed"

    run_retry_compensation(saga_id="h-4")
    Worker().drain()

    assert run("h-4").status == "compensated"
    assert effect_keys("h-4")[-2:] == [
        ("compensation", "h-4:charge_payment:2"),
        ("compensation", "h-4:create_order:2"),
    ]
    assert Saga.objects.get(saga_id="h-4").status == "compensated"


def test_compensate_and_cancel_undo_what_was_done() -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="h-5")
    Worker().drain()
    run_compensate(saga_id="h-5")
    Worker().drain()
    assert run("h-5").status == "compensated"
    assert effect_keys("h-5")[-1] == ("compensation", "h-5:create_order:1")


def test_skip_step_abandons_a_waiting_command_and_goes_on() -> None:
    saga_start(saga_type="test-remote", saga_id="h-6")
    Worker().drain()
    command_id = StepRun.objects.get(run__saga_id="h-6", name="charge_payment").command_id
    run_skip_step(saga_id="h-6")
    assert not step_reply(command_id=command_id, ok=True)  # its late reply changes nothing
    Worker().drain()
    assert run("h-6").status == "completed"
    assert StepRun.objects.get(run__saga_id="h-6", name="charge_payment").status == "skipped"


def test_pause_keeps_workers_away_until_resume() -> None:
    saga_start(saga_type="test-order", saga_id="h-7")
    run_pause(saga_id="h-7")
    assert Worker().drain() == 0
    assert run("h-7").waiting == "paused by an operator"
    with pytest.raises(Refused, match="cannot pause a paused saga"):
        run_pause(saga_id="h-7")
    run_resume(saga_id="h-7")
    Worker().drain()
    assert run("h-7").status == "completed"


def test_terminate_stops_without_compensating() -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="h-8")
    Worker().drain()
    run_terminate(saga_id="h-8")
    assert Worker().drain() == 0
    assert run("h-8").status == "terminated"
    assert [k for k, _ in effect_keys("h-8")] == ["forward"]  # nothing undone
    saga = Saga.objects.get(saga_id="h-8")
    assert saga.status == "cancelled" and saga.last_error["type"] == "terminated"


def test_rerun_from_a_step_with_edited_data() -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="h-9", data={"amount": 10})
    Worker().drain()
    with pytest.raises(Refused, match="no step 'ship'; steps: create_order, charge_payment"):
        run_rerun_from(saga_id="h-9", step="ship")
    run_rerun_from(saga_id="h-9", step="create_order", data={"amount": 12})
    Worker().drain()
    assert run("h-9").status == "completed" and run("h-9").data == {"amount": 12}
    assert effect_keys("h-9") == [
        ("forward", "h-9:create_order:1"),
        ("forward", "h-9:create_order:2"),
        ("forward", "h-9:charge_payment:2"),
    ]
    with pytest.raises(Refused, match="cannot rerun a saga that is completed"):
        run_rerun_from(saga_id="h-9", step="create_order")


def test_retry_and_skip_refuse_a_step_other_than_the_current_one() -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="h-10")
    Worker().drain()
    with pytest.raises(Refused, match="the step to skip now is charge_payment, not create_order"):
        run_skip_step(saga_id="h-10", step="create_order")
    run_retry_step(saga_id="h-10", step="charge_payment")
    Worker().drain()
    assert run("h-10").status == "completed"


def test_a_run_that_cannot_be_advanced_is_set_aside_not_fatal() -> None:
    saga_start(saga_type="test-order", saga_id="h-11")
    SagaRun.objects.filter(saga_id="h-11").update(saga_type="no-such-type")
    assert Worker().run_once() == 1  # it tried once, logged, and went on
    parked = run("h-11")
    assert parked.waiting.startswith("error, retried in a minute: UnknownSagaType")
    assert parked.lease_owner == "" and parked.next_run_at is not None
