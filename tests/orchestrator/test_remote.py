"""Remote steps: commands out through the outbox, replies back (message or telemetry), fencing."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from orchestrator.engine import run_advance, saga_start, step_reply
from orchestrator.models import SagaRun, StepRun
from orchestrator.worker import Worker, claim_release, runs_claim
from outbox.models import OutboxMessage
from tests.orchestrator import sagas
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import Saga, TelemetryEvent

pytestmark = pytest.mark.django_db


def commands() -> list[dict[str, Any]]:
    return [
        {"type": m.type, **json.loads(m.payload)}
        for m in OutboxMessage.objects.filter(aggregatetype="sagaadmin.commands").order_by("seq")
    ]


def charge() -> StepRun:
    return StepRun.objects.get(name="charge_payment")


def test_a_remote_step_sends_a_command_and_completes_on_the_reply() -> None:
    saga_start(saga_type="test-remote", saga_id="r-1", data={"amount": 42})
    Worker().drain()

    run = SagaRun.objects.get()
    assert run.status == "running" and run.waiting == "waiting for payment to answer charge"
    [command] = commands()
    assert command["type"] == "payment.charge"
    assert command["command_id"] == charge().command_id and len(command["command_id"]) == 32
    assert (command["action"], command["saga_id"], command["step"], command["attempt"]) == (
        "charge",
        "r-1",
        "charge_payment",
        1,
    )
    assert command["idempotency_key"] == "r-1:charge_payment:1" and command["epoch"] == 1
    assert command["data"] == {"amount": 42} and command["reply_to"] == "sagaadmin.replies"
    assert run.next_run_at == charge().deadline  # it looks again when the reply is overdue

    assert step_reply(command_id=command["command_id"], ok=True, result={"charge_id": "ch_9"})
    assert not step_reply(command_id=command["command_id"], ok=True)  # a duplicate: ignored
    Worker().drain()

    run.refresh_from_db()
    assert run.status == "completed"
    assert run.results["charge_payment"] == {"charge_id": "ch_9"}
    assert Saga.objects.get(saga_id="r-1").status == "completed"


def test_a_timed_out_command_is_retried_and_the_late_reply_of_the_first_is_ignored() -> None:
    saga_start(saga_type="test-remote", saga_id="r-2")
    Worker().drain()
    first = charge().command_id

    later = charge().deadline + timedelta(seconds=1)  # no answer in time
    [claim] = runs_claim(owner="w", limit=1, now=later)
    assert run_advance(claim, now=later) is False  # timed out: a retry waits; handed back
    [claim] = runs_claim(owner="w", limit=1, now=later)
    assert run_advance(claim, now=later) is False  # the retry's command went: its reply waits
    claim_release(claim)

    step = charge()
    assert step.attempt == 2 and step.command_id not in ("", first)
    assert not step_reply(command_id=first, ok=True)  # the first attempt's reply, too late
    assert step_reply(command_id=step.command_id, ok=True)
    Worker().drain()
    assert SagaRun.objects.get().status == "completed"
    timed_out = TelemetryEvent.objects.get(saga_id="r-2", type="step.timed_out")
    assert (timed_out.step, timed_out.attempt, timed_out.error["type"]) == (
        "charge_payment",
        1,
        "timeout",
    )
    assert [c["attempt"] for c in commands()] == [1, 2]
    assert commands()[0]["idempotency_key"] == commands()[1]["idempotency_key"]  # one epoch


def test_a_refused_command_compensates_the_steps_before_it() -> None:
    saga_start(saga_type="test-remote", saga_id="r-3")
    Worker().drain()
    assert step_reply(
        command_id=charge().command_id,
        ok=False,
        error={"type": "CardDeclined", "message": "no funds", "retryable": False},
    )
    Worker().drain()
    run = SagaRun.objects.get()
    assert run.status == "compensated"
    assert charge().status == "failed" and charge().last_error["type"] == "CardDeclined"
    assert ("compensation", "reserve_stock") in [
        (json.loads(m.payload)["phase"], json.loads(m.payload)["step"])
        for m in OutboxMessage.objects.filter(type="test.effect")
    ]


def test_a_completed_remote_step_is_undone_with_an_undo_command() -> None:
    sagas.SCRIPT["forward:create_shipment"] = ["fatal"]
    saga_start(saga_type="test-remote", saga_id="r-4")
    Worker().drain()
    step_reply(command_id=charge().command_id, ok=True)
    Worker().drain()
    undo = commands()[-1]
    assert undo["type"] == "payment.undo_charge" and undo["action"] == "undo_charge"
    assert charge().status == "compensating"
    assert step_reply(command_id=undo["command_id"], ok=True)
    Worker().drain()
    assert SagaRun.objects.get().status == "compensated"
    assert charge().status == "compensated"


def test_a_service_may_answer_with_telemetry_naming_the_command(
    django_capture_on_commit_callbacks: Any,
) -> None:
    saga_start(saga_type="test-remote", saga_id="r-5")
    Worker().drain()
    event = {
        "id": "pay-1",
        "saga_id": "r-5",
        "type": "step.succeeded",
        "step": "charge_payment",
        "occurred_at": timezone.now().isoformat(),
        "attributes": {"command_id": charge().command_id},
    }
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        events_ingest(
            service=service_get_or_create(name="payment"), raws=[json.dumps(event).encode()]
        )
    assert charge().status == "succeeded"
    Worker().drain()
    assert SagaRun.objects.get().status == "completed"


def test_tcc_participants_prepare_then_commit_when_the_saga_succeeds() -> None:
    saga_start(saga_type="test-tcc", saga_id="t-1")
    Worker().drain()
    assert SagaRun.objects.get().status == "completed"
    assert StepRun.objects.get(name="hold_seat").tx_state == "committed"
    types = list(
        TelemetryEvent.objects.filter(saga_id="t-1")
        .order_by("sequence")
        .values_list("type", flat=True)
    )
    assert types.index("tx.prepared") < types.index("tx.committed") < types.index("saga.completed")


def test_tcc_participants_roll_back_when_the_saga_compensates() -> None:
    sagas.SCRIPT["forward:charge_card"] = ["fatal"]
    saga_start(saga_type="test-tcc", saga_id="t-2")
    Worker().drain()
    assert SagaRun.objects.get().status == "compensated"
    assert StepRun.objects.get(name="hold_seat").tx_state == "rolled_back"
    assert TelemetryEvent.objects.filter(saga_id="t-2", type="tx.rolled_back").count() == 1
    assert not TelemetryEvent.objects.filter(saga_id="t-2", type="tx.committed").exists()


def test_a_step_whose_command_was_never_answered_is_undone_too() -> None:
    """Nobody knows whether the service did the work: compensation sends its undo."""
    saga_start(saga_type="test-remote", saga_id="r-6")
    Worker().drain()
    for _ in range(10):  # every attempt times out (and each retry is sent again)
        if charge().status != "running":
            break
        later = charge().deadline + timedelta(seconds=1)
        for _ in range(2):  # the timeout, then the retry due at that moment
            for claim in runs_claim(owner="w", limit=5, now=later):
                while run_advance(claim, now=later):
                    pass
                claim_release(claim)
    assert charge().attempt == 3
    assert charge().status == "compensating"
    undo = commands()[-1]
    assert (undo["type"], undo["step"]) == ("payment.undo_charge", "charge_payment")
    assert step_reply(command_id=undo["command_id"], ok=True)
    Worker().drain()
    assert SagaRun.objects.get().status == "compensated"
