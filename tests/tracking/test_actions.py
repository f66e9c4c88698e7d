"""Operator actions: role, version, state checks, dispatch both ways, progress, audit."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, connections, transaction
from django.utils import timezone

from orchestrator.engine import saga_start
from orchestrator.models import SagaRun
from orchestrator.worker import Worker
from outbox.models import OutboxMessage
from tests.conftest import role_group
from tracking.actions import ActionError, ActionInput, actions_overdue_mark, saga_action_run
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import AuditEntry, OperatorAction, Saga

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("test_sagas")]


def user(role: str | None) -> Any:
    u = get_user_model().objects.create_user(f"u-{role}-{timezone.now().timestamp()}", password="x")
    if role:
        u.groups.add(role_group(role))
    return get_user_model().objects.get(pk=u.pk)  # fresh permission cache


def report(saga_id: str, *events: dict[str, Any], service: str = "payment") -> None:
    raws = [
        json.dumps(
            {
                "id": f"{saga_id}-{i}-{e['type']}",
                "saga_id": saga_id,
                "occurred_at": timezone.now().isoformat(),
                **e,
            }
        ).encode()
        for i, e in enumerate(events)
    ]
    with transaction.atomic():
        events_ingest(service=service_get_or_create(name=service), raws=raws)


def failed_external(saga_id: str = "ext-1", *, ended: bool = True) -> Saga:
    """An external saga whose step failed (and, ``ended``, the saga too)."""
    events = [
        {"type": "saga.started", "saga_type": "order"},
        {"type": "step.started", "step": "charge"},
        {"type": "step.failed", "step": "charge", "error": {"type": "Timeout", "retryable": True}},
    ]
    report(saga_id, *events, *([{"type": "saga.failed"}] if ended else []))
    return Saga.objects.get(saga_id=saga_id)


def act(action: str, saga: Saga, who: Any, **kw: Any) -> dict[str, Any]:
    return saga_action_run(
        ActionInput(
            action=action,
            saga_id=saga.saga_id,
            actor=who,
            reason=kw.pop("reason", "customer called"),
            expected_version=kw.pop("expected_version", saga.version),
            **kw,
        )
    )


def commands() -> list[dict[str, Any]]:
    return [
        {"type": m.type, **json.loads(m.payload)}
        for m in OutboxMessage.objects.filter(aggregatetype="sagaadmin.commands").order_by("seq")
    ]


def test_an_external_saga_gets_a_command_and_its_progress_follows_telemetry() -> None:
    saga = failed_external()
    answer = act("retry_step", saga, user("operator"))

    assert answer["status"] == "dispatched" and not answer["orchestrated"]
    [command] = commands()
    assert command["type"] == "payment.retry_step"
    assert (command["action"], command["step"], command["reason"]) == (
        "retry_step",
        "charge",
        "customer called",
    )
    assert command["command_id"] == answer["command_id"]
    assert command["idempotency_key"] == "ext-1:charge:retry_step:1" and command["epoch"] == 1
    assert Saga.objects.get(saga_id="ext-1").version == answer["version"] == saga.version + 1
    [entry] = AuditEntry.objects.all()
    assert (entry.action, entry.outcome, entry.reason, entry.role) == (
        "retry_step",
        "dispatched",
        "customer called",
        "operator",
    )
    assert entry.state_before["status"] == "failed"

    # the service obeys and reports back, naming the command (ingest forwards
    # such events after its commit: called directly here)
    from tracking.ingest import command_answers_forward
    from tracking.protocol import decode_event

    record = OperatorAction.objects.get()
    started = {
        "id": "obey-1",
        "saga_id": "ext-1",
        "type": "step.started",
        "step": "charge",
        "attempt": 2,
        "occurred_at": timezone.now().isoformat(),
        "attributes": {"command_id": record.command_id},
    }
    command_answers_forward([decode_event(json.dumps(started).encode())])
    assert OperatorAction.objects.get().status == "acknowledged"
    done = {**started, "id": "obey-2", "type": "step.succeeded"}
    command_answers_forward([decode_event(json.dumps(done).encode())])
    record.refresh_from_db()
    assert record.status == "done" and record.finished_at is not None


def test_an_orchestrated_saga_goes_through_its_hook() -> None:
    from tests.orchestrator import sagas

    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="orc-1")
    Worker().drain()
    saga = Saga.objects.get(saga_id="orc-1")

    answer = act("retry_step", saga, user("operator"))
    Worker().drain()

    assert answer["status"] == "done" and answer["orchestrated"]
    assert SagaRun.objects.get(saga_id="orc-1").status == "completed"
    assert Saga.objects.get(saga_id="orc-1").status == "completed"
    assert commands() == []  # no command message: the orchestrator did it


@pytest.mark.parametrize(
    ("role", "action", "allowed"),
    [
        ("viewer", "retry_step", False),
        ("operator", "retry_step", True),
        ("operator", "terminate", False),
        ("admin", "terminate", True),
        (None, "compensate", False),
    ],
)
def test_roles_and_a_refusal_is_audited(role: str | None, action: str, allowed: bool) -> None:
    saga = failed_external(ended=False)
    who = user(role)
    if allowed:
        act(action, saga, who)
        assert AuditEntry.objects.get().outcome == "dispatched"
        return
    with pytest.raises(ActionError) as caught:
        act(action, saga, who)
    assert caught.value.status == 403 and caught.value.field == "role"
    entry = AuditEntry.objects.get()
    assert (entry.outcome, entry.actor, entry.action) == ("forbidden", who.username, action)
    assert commands() == []


def test_a_stale_version_is_409_with_the_current_one() -> None:
    saga = failed_external()
    with pytest.raises(ActionError) as caught:
        act("compensate", saga, user("operator"), expected_version=saga.version - 1)
    assert caught.value.status == 409 and caught.value.extra["current_version"] == saga.version
    assert AuditEntry.objects.get().outcome == "conflict"


def test_a_reason_is_required_and_the_state_must_allow_it() -> None:
    saga = failed_external()
    with pytest.raises(ActionError, match="reason: say why"):
        act("compensate", saga, user("operator"), reason="  ")
    with pytest.raises(ActionError, match="cannot cancel a saga that is failed") as caught:
        act("cancel", saga, user("operator"))
    assert caught.value.status == 409
    with pytest.raises(ActionError, match="for orchestrated sagas only"):
        act("pause", saga, user("operator"))
    assert [e.outcome for e in AuditEntry.objects.order_by("pk")] == ["conflict", "conflict"]


def test_a_resubmitted_request_id_returns_the_first_answer_and_dispatches_once() -> None:
    saga = failed_external()
    who = user("operator")
    first = act("retry_step", saga, who, request_id="req-1")
    again = act("retry_step", saga, who, request_id="req-1")  # same version it saw
    assert again == {**first, "resubmitted": True}
    assert len(commands()) == 1 and OperatorAction.objects.count() == 1


def test_an_unanswered_command_times_out() -> None:
    saga = failed_external()
    act("retry_step", saga, user("operator"))
    assert actions_overdue_mark(now=timezone.now()) == 0
    assert actions_overdue_mark(now=timezone.now() + timedelta(seconds=301)) == 1
    assert OperatorAction.objects.get().status == "timed_out"


@pytest.mark.django_db(transaction=True)
def test_two_operators_at_once_one_wins_one_gets_409(postgres: None) -> None:
    saga = failed_external("race-1")
    people = [user("operator"), user("operator")]
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []

    def go(who: Any) -> None:
        try:
            barrier.wait()
            outcomes.append(act("compensate", saga, who)["status"])
        except ActionError as exc:
            outcomes.append(exc.status)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=go, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, outcomes)) == ["409", "dispatched"]
    assert len(commands()) == 1
    assert sorted(AuditEntry.objects.values_list("outcome", flat=True)) == [
        "conflict",
        "dispatched",
    ]


def test_the_audit_log_cannot_be_changed_on_postgresql(postgres: None) -> None:
    saga = failed_external()
    act("compensate", saga, user("operator"))
    entry = AuditEntry.objects.get()
    for attempt in (
        lambda: AuditEntry.objects.filter(pk=entry.pk).update(reason="nothing happened"),
        lambda: AuditEntry.objects.filter(pk=entry.pk).delete(),
    ):
        with pytest.raises(Exception, match="append-only"), transaction.atomic():
            attempt()
    assert AuditEntry.objects.get().reason == "customer called"
    assert connection.vendor == "postgresql"


def test_the_two_person_rule_waits_for_a_second_operator(settings: Any) -> None:
    from tracking.actions import action_approve, action_reject

    settings.SAGAADMIN = {**settings.SAGAADMIN, "TWO_PERSON_ACTIONS": ["terminate"]}
    saga = failed_external(ended=False)
    requester, approver = user("admin"), user("admin")
    answer = act("terminate", saga, requester)
    assert answer["status"] == "awaiting_approval" and commands() == []
    with pytest.raises(ActionError, match="a second person must approve") as caught:
        action_approve(action_id=answer["id"], user=requester)
    assert caught.value.status == 403
    assert OperatorAction.objects.get().status == "awaiting_approval"  # still waiting
    approved = action_approve(action_id=answer["id"], user=approver)
    assert approved["status"] == "dispatched"
    assert [c["action"] for c in commands()] == ["terminate"]
    record = OperatorAction.objects.get()
    assert record.approved_by == approver.username
    assert [e.outcome for e in AuditEntry.objects.order_by("pk")] == [
        "awaiting_approval",
        "forbidden",  # the requester's own approval, refused
        "approved",
    ]
    with pytest.raises(ActionError, match="not awaiting approval"):
        action_reject(action_id=answer["id"], user=approver)


def test_a_rejected_action_dispatches_nothing(settings: Any) -> None:
    from tracking.actions import action_reject

    settings.SAGAADMIN = {**settings.SAGAADMIN, "TWO_PERSON_ACTIONS": ["skip_step"]}
    saga = failed_external(ended=False)
    answer = act("skip_step", saga, user("operator"))
    rejected = action_reject(action_id=answer["id"], user=user("operator"), note="not this one")
    assert rejected["status"] == "rejected" and commands() == []
    assert AuditEntry.objects.order_by("pk").last().outcome == "rejected"


def test_a_finished_saga_is_refused_for_its_state_before_its_step() -> None:
    report(
        "done-1",
        {"type": "saga.started", "saga_type": "order"},
        {"type": "step.started", "step": "charge"},
        {"type": "step.succeeded", "step": "charge"},
        {"type": "saga.completed"},
    )
    saga = Saga.objects.get(saga_id="done-1")
    for action in ("retry_step", "skip_step"):
        with pytest.raises(ActionError, match="a saga that is completed") as caught:
            act(action, saga, user("operator"))
        assert caught.value.field == "status"


def test_an_edited_rerun_keeps_the_secrets_it_was_shown_redacted() -> None:
    from tracking.actions import unredacted

    stored = {"amount": 10, "card_number": "4111111111111111", "nested": {"token": "t-1", "n": 1}}
    edited = {"amount": 12, "card_number": "[redacted]", "nested": {"token": "[redacted]", "n": 2}}
    assert unredacted(edited, stored) == {
        "amount": 12,
        "card_number": "4111111111111111",
        "nested": {"token": "t-1", "n": 2},
    }
    assert unredacted({"new": "[redacted]"}, stored) == {"new": "[redacted]"}  # nothing to restore
