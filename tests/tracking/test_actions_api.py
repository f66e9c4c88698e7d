"""/api/v1/sagas/{id}/actions, /api/v1/actions/{id}, /api/v1/audit and manage.py saga_action."""

from __future__ import annotations

import csv
import io
import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from django.test import AsyncClient, Client
from django.utils import timezone

from orchestrator.engine import saga_start
from orchestrator.models import SagaRun, StepRun
from orchestrator.worker import Worker
from outbox.models import OutboxMessage
from tests.conftest import role_group
from tracking.actions import ACTIONS, actions_available
from tracking.ingest import command_answers_forward, events_ingest
from tracking.keys import service_get_or_create
from tracking.models import AuditEntry, OperatorAction, Saga
from tracking.protocol import decode_event

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("test_sagas")]

PROBLEM = "application/problem+json"
_names = itertools.count()
ROLE_PERMITS = {
    "viewer": set(),
    "operator": set(ACTIONS) - {"terminate"},
    "admin": set(ACTIONS),
}


# -- helpers ---------------------------------------------------------------------------


def person(role: str | None) -> tuple[Client, Any]:
    user = get_user_model().objects.create_user(f"{role}-{next(_names)}", password="pw-x-12345")
    if role:
        user.groups.add(role_group(role))
    client = Client()
    client.force_login(user)
    return client, user


def report(saga_id: str, *events: dict[str, Any], service: str = "payment") -> None:
    raws = [
        json.dumps(
            {
                "id": f"{saga_id}-{next(_names)}",
                "saga_id": saga_id,
                "occurred_at": timezone.now().isoformat(),
                **e,
            }
        ).encode()
        for e in events
    ]
    with transaction.atomic():
        result = events_ingest(service=service_get_or_create(name=service), raws=raws)
    assert all(r.status == "accepted" for r in result.results), result


def failed_external(saga_id: str = "ext-1") -> Saga:
    """An external saga (reported by payment) whose step charge failed; the saga runs on."""
    report(
        saga_id,
        {"type": "saga.started", "saga_type": "order"},
        {"type": "step.started", "step": "charge"},
        {"type": "step.failed", "step": "charge", "error": {"type": "Timeout", "retryable": True}},
    )
    return Saga.objects.get(saga_id=saga_id)


def waiting_retry(saga_id: str) -> Saga:
    """An orchestrated saga whose charge_payment failed once; its retry is a minute away."""
    from tests.orchestrator import sagas

    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id=saga_id, data={"amount": 10})
    Worker().drain()
    assert SagaRun.objects.get(saga_id=saga_id).waiting.startswith("retry 2 of charge_payment")
    return Saga.objects.get(saga_id=saga_id)


def version(saga_id: str) -> int:
    return Saga.objects.get(saga_id=saga_id).version


def post(client: Client, saga_id: str, action: str, **body: Any) -> Any:
    body.setdefault("reason", "customer called")
    if "expected_version" not in body:
        body["expected_version"] = version(saga_id)
    return client.post(
        f"/api/v1/sagas/{saga_id}/actions/{action}", body, content_type="application/json"
    )


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def commands() -> list[dict[str, Any]]:
    return [
        {"type": m.type, **json.loads(m.payload)}
        for m in OutboxMessage.objects.filter(aggregatetype="sagaadmin.commands").order_by("seq")
    ]


def effects(saga_id: str) -> list[tuple[str, str]]:
    rows = OutboxMessage.objects.filter(type="test.effect", aggregateid=saga_id).order_by("seq")
    return [(p["phase"], p["step"]) for p in (json.loads(m.payload) for m in rows)]


def run_of(saga_id: str) -> SagaRun:
    return SagaRun.objects.get(saga_id=saga_id)


# -- who may run what --------------------------------------------------------------------


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
@pytest.mark.parametrize("action", list(ACTIONS))
def test_the_role_action_matrix(role: str, action: str) -> None:
    """Each role may run exactly its actions; a refused role is 403 naming `role`, audited."""
    saga = waiting_retry("m-1")
    client, user = person(role)

    response = post(client, "m-1", action, step="charge_payment" if action == "rerun" else "")

    [entry] = AuditEntry.objects.all()
    assert (entry.actor, entry.action, entry.saga_id, entry.role) == (
        user.username,
        action,
        "m-1",
        role,
    )
    if action in ROLE_PERMITS[role]:
        # allowed: done, or refused by the saga's state, never by the role
        if response.status_code == 200:
            assert response.json()["status"] == "done"
            assert entry.outcome == "done"
            assert version("m-1") > saga.version
        else:
            body = assert_problem(response, 409)
            assert "role" not in [e["field"] for e in body["errors"]]
            assert entry.outcome == "conflict"
            assert version("m-1") == saga.version
    else:
        body = assert_problem(response, 403, "role")
        assert body["type"].endswith("/forbidden")
        assert f"may not {ACTIONS[action].label.lower()}" in body["detail"].lower()
        assert entry.outcome == "forbidden"
        assert entry.state_before == entry.state_after
        assert (entry.state_before["status"], entry.state_before["version"]) == (
            "running",
            saga.version,
        )
        assert version("m-1") == saga.version
        assert OperatorAction.objects.get().status == "refused"


def test_the_matrix_saga_allows_most_actions_so_the_matrix_tests_roles() -> None:
    """On the matrix's saga the state allows these (an admin may run each), so a 403
    there comes from the role, and a 409 from the state."""
    waiting_retry("m-2")
    _, admin = person("admin")
    allowed = {a.name for a in actions_available(saga_id="m-2", user=admin) if a.allowed}
    assert allowed == {
        "retry_step",
        "compensate",
        "skip_step",
        "cancel",
        "terminate",
        "pause",
        "rerun",
    }


def test_people_without_a_role_and_service_keys_are_turned_away_unaudited(service_key) -> None:
    failed_external()
    nobody, _ = person(None)
    key = Client(HTTP_AUTHORIZATION=f"Bearer {service_key.secret}")
    for client in (nobody, key, Client()):
        response = post(client, "ext-1", "retry_step")
        assert response.status_code in (401, 403)
        assert response["Content-Type"] == PROBLEM
        assert client.get("/api/v1/sagas/ext-1/actions").status_code in (401, 403)
        assert client.get("/api/v1/audit").status_code in (401, 403)
    assert AuditEntry.objects.count() == 0
    assert commands() == []


# -- each action end to end on an orchestrated saga -------------------------------------


def test_retry_step_runs_the_failed_step_again() -> None:
    waiting_retry("e-retry")
    client, user = person("operator")

    response = post(client, "e-retry", "retry_step")
    Worker().drain()

    assert response.status_code == 200, response.content
    answer = response.json()
    assert (answer["action"], answer["status"], answer["orchestrated"]) == (
        "retry_step",
        "done",
        True,
    )
    assert answer["command_id"] == ""
    assert run_of("e-retry").status == "completed"
    assert Saga.objects.get(saga_id="e-retry").status == "completed"
    assert effects("e-retry") == [("forward", "create_order"), ("forward", "charge_payment")]
    record = OperatorAction.objects.get(pk=answer["id"])
    assert (record.status, record.step, record.actor) == ("done", "charge_payment", user.username)
    [entry] = AuditEntry.objects.all()
    assert (entry.outcome, entry.step, entry.operator_action_id) == (
        "done",
        "charge_payment",
        record.pk,
    )
    assert commands() == []


def test_skip_step_counts_the_step_as_done() -> None:
    from tests.orchestrator import sagas

    waiting_retry("e-skip")
    client, _ = person("operator")

    assert post(client, "e-skip", "skip_step").status_code == 200
    Worker().drain()

    assert run_of("e-skip").status == "completed"
    assert StepRun.objects.get(run__saga_id="e-skip", name="charge_payment").status == "skipped"
    assert sagas.CALLS["forward:charge_payment"] == 1  # not called again
    assert Saga.objects.get(saga_id="e-skip").status == "completed"


def test_compensate_undoes_what_was_done() -> None:
    waiting_retry("e-comp")
    client, _ = person("operator")

    assert post(client, "e-comp", "compensate").status_code == 200
    Worker().drain()

    assert run_of("e-comp").status == "compensated"
    assert effects("e-comp")[-1] == ("compensation", "create_order")
    assert Saga.objects.get(saga_id="e-comp").status == "compensated"


def test_cancel_compensates_a_running_saga() -> None:
    waiting_retry("e-cancel")
    client, _ = person("operator")

    assert post(client, "e-cancel", "cancel").status_code == 200
    Worker().drain()

    assert run_of("e-cancel").status == "compensated"
    assert run_of("e-cancel").last_error["type"] == "cancelled"
    assert effects("e-cancel")[-1] == ("compensation", "create_order")


def test_terminate_stops_without_compensating_admins_only() -> None:
    waiting_retry("e-term")
    operator, _ = person("operator")
    admin, _ = person("admin")
    assert_problem(post(operator, "e-term", "terminate"), 403, "role")

    assert post(admin, "e-term", "terminate").status_code == 200
    assert Worker().drain() == 0

    assert run_of("e-term").status == "terminated"
    assert [phase for phase, _ in effects("e-term")] == ["forward"]
    saga = Saga.objects.get(saga_id="e-term")
    assert saga.status == "cancelled" and saga.last_error["type"] == "terminated"
    assert [e.outcome for e in AuditEntry.objects.order_by("pk")] == ["forbidden", "done"]


def test_pause_keeps_the_workers_away_until_resume() -> None:
    saga_start(saga_type="test-order", saga_id="e-pause")
    client, _ = person("operator")
    assert_problem(post(client, "e-pause", "resume"), 409, "status")  # not paused

    assert post(client, "e-pause", "pause").status_code == 200
    assert Worker().drain() == 0
    assert run_of("e-pause").paused and effects("e-pause") == []
    assert_problem(post(client, "e-pause", "pause"), 409)  # paused already

    assert post(client, "e-pause", "resume").status_code == 200
    Worker().drain()
    assert run_of("e-pause").status == "completed"
    assert len(effects("e-pause")) == 4


def test_rerun_from_a_step_with_edited_data_needs_an_admin() -> None:
    waiting_retry("e-rerun")
    operator, _ = person("operator")
    admin, _ = person("admin")
    edited = {"amount": 12}

    refused = post(operator, "e-rerun", "rerun", step="create_order", data=edited)
    assert_problem(refused, 403, "data")
    assert AuditEntry.objects.get().outcome == "forbidden"

    response = post(admin, "e-rerun", "rerun", step="create_order", data=edited)
    Worker().drain()

    assert response.status_code == 200, response.content
    assert run_of("e-rerun").status == "completed"
    assert run_of("e-rerun").data == edited
    assert effects("e-rerun") == [
        ("forward", "create_order"),
        ("forward", "create_order"),
        ("forward", "charge_payment"),
    ]
    assert OperatorAction.objects.get(pk=response.json()["id"]).data == edited
    shown = admin.get(f"/api/v1/actions/{response.json()['id']}").json()
    assert (shown["data"], shown["step"]) == (edited, "create_order")


def test_rerun_of_an_unknown_step_is_400_naming_the_step() -> None:
    waiting_retry("e-rerun-2")
    client, _ = person("operator")
    assert_problem(post(client, "e-rerun-2", "rerun", step="ship"), 400, "step")


def test_restart_starts_a_new_saga_with_the_same_data() -> None:
    saga_start(saga_type="test-order", saga_id="e-restart", data={"amount": 5})
    Worker().drain()
    client, _ = person("operator")

    response = post(client, "e-restart", "restart")
    Worker().drain()

    assert response.status_code == 200, response.content
    [new] = SagaRun.objects.exclude(saga_id="e-restart")
    assert new.saga_id.startswith("e-restart~")
    assert new.data == {"amount": 5, "restarted_from": "e-restart"}
    assert new.status == "completed"
    assert run_of("e-restart").status == "completed"


def test_retry_compensation_after_it_failed_for_good() -> None:
    from tests.orchestrator import sagas

    sagas.SCRIPT["forward:reserve_stock"] = ["fatal"]
    sagas.SCRIPT["compensation:charge_payment"] = ["fail", "fail", "fail"]
    saga_start(saga_type="test-order", saga_id="e-rc")
    Worker().drain()
    assert Saga.objects.get(saga_id="e-rc").status == "compensation_failed"
    client, _ = person("operator")

    assert post(client, "e-rc", "retry_compensation").status_code == 200
    Worker().drain()

    assert run_of("e-rc").status == "compensated"
    assert Saga.objects.get(saga_id="e-rc").status == "compensated"
    assert effects("e-rc")[-2:] == [
        ("compensation", "charge_payment"),
        ("compensation", "create_order"),
    ]


# -- an external saga: a command, 202 and its progress -----------------------------------


def test_an_external_saga_gets_202_a_command_and_its_progress_is_readable() -> None:
    saga = failed_external()
    client, user = person("operator")

    response = post(client, "ext-1", "retry_step", reason="card fixed")

    assert response.status_code == 202, response.content
    answer = response.json()
    assert answer == {
        "action": "retry_step",
        "saga_id": "ext-1",
        "status": "dispatched",
        "command_id": answer["command_id"],
        "orchestrated": False,
        "version": saga.version + 1,
        "id": answer["id"],
    }
    assert response["Location"] == f"/api/v1/actions/{answer['id']}"
    [command] = commands()
    assert (command["type"], command["command_id"], command["reason"]) == (
        "payment.retry_step",
        answer["command_id"],
        "card fixed",
    )
    progress = client.get(response["Location"]).json()
    assert (progress["status"], progress["service"], progress["step"]) == (
        "dispatched",
        "payment",
        "charge",
    )
    assert progress["actor"] == user.username and progress["dispatched_at"] is not None

    # the service starts the step naming the command: acknowledged
    started = {
        "id": "obey-1",
        "saga_id": "ext-1",
        "type": "step.started",
        "step": "charge",
        "attempt": 2,
        "occurred_at": timezone.now().isoformat(),
        "attributes": {"command_id": answer["command_id"]},
    }
    command_answers_forward([decode_event(json.dumps(started).encode())])
    progress = client.get(response["Location"]).json()
    assert progress["status"] == "acknowledged" and progress["acknowledged_at"] is not None
    assert progress["finished_at"] is None


def test_a_sagas_actions_list_availability_and_history() -> None:
    saga = failed_external()
    operator, _ = person("operator")
    viewer, _ = person("viewer")
    first = post(operator, "ext-1", "retry_step").json()
    assert_problem(post(operator, "ext-1", "pause"), 409, "action")

    body = operator.get("/api/v1/sagas/ext-1/actions").json()

    assert (body["saga_id"], body["version"]) == ("ext-1", saga.version + 1)
    available = {a["name"]: a for a in body["available"]}
    assert list(available) == list(ACTIONS)
    assert available["retry_step"]["allowed"] and available["retry_step"]["step"] == "charge"
    assert not available["terminate"]["allowed"]
    assert "may not terminate" in available["terminate"]["reason"]
    assert not available["pause"]["allowed"]
    assert "orchestrated sagas only" in available["pause"]["reason"]
    # newest first, refusals included
    assert [(h["action"], h["status"]) for h in body["history"]] == [
        ("pause", "refused"),
        ("retry_step", "dispatched"),
    ]
    assert body["history"][1]["id"] == first["id"]
    assert body["history"][0]["error"]["field"] == "action"
    # a viewer sees the same history, and may do nothing
    seen = viewer.get("/api/v1/sagas/ext-1/actions").json()
    assert seen["history"] == body["history"]
    assert not any(a["allowed"] for a in seen["available"])
    assert_problem(operator.get("/api/v1/sagas/nope/actions"), 404)
    assert_problem(operator.get("/api/v1/actions/999999"), 404)


# -- refusals as problems -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expected_version": 1}, "reason"),
        ({"reason": "   ", "expected_version": None}, "reason"),
        ({"reason": "x" * 2001, "expected_version": None}, "reason"),
        ({"reason": "x"}, "expected_version"),
        ({"reason": "x", "expected_version": "soon"}, "expected_version"),
        ({"reason": "x", "expected_version": None, "data": {"a": 1}}, "data"),
        ({"reason": "x", "expected_version": None, "request_id": ""}, "request_id"),
        ({"reason": "x", "expected_version": None, "request_id": "r" * 101}, "request_id"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(body: dict[str, Any], field: str) -> None:
    saga = failed_external()
    client, _ = person("operator")
    if body.get("expected_version", 0) is None:
        body["expected_version"] = saga.version
    response = client.post(
        "/api/v1/sagas/ext-1/actions/retry_step", body, content_type="application/json"
    )
    assert_problem(response, 400, field)
    assert commands() == [] and version("ext-1") == saga.version


def test_rerun_data_must_be_an_object() -> None:
    waiting_retry("d-1")
    client, _ = person("admin")
    assert_problem(post(client, "d-1", "rerun", data=[1, 2]), 400, "data")
    assert run_of("d-1").data == {"amount": 10}


def test_a_stale_version_is_409_with_the_current_one_and_audited() -> None:
    saga = failed_external()
    client, _ = person("operator")
    body = assert_problem(
        post(client, "ext-1", "compensate", expected_version=saga.version - 1), 409, "version"
    )
    assert body["current_version"] == saga.version
    assert body["type"].endswith("/conflict")
    assert AuditEntry.objects.get().outcome == "conflict"
    assert commands() == []


def test_a_number_where_text_belongs_and_a_version_out_of_range_are_named() -> None:
    failed_external()
    client, _ = person("operator")
    # "reason": 123 was taken as "123" and the action ran
    response = post(client, "ext-1", "retry_step", reason=123, expected_version=1)
    assert_problem(response, 400, "reason")
    response = post(client, "ext-1", "retry_step", step=7, expected_version=1)
    assert_problem(response, 400, "step")
    # a misspelt key is refused, not ignored (the action would take its default step)
    response = post(client, "ext-1", "retry_step", stpe="charge", expected_version=1)
    assert_problem(response, 400, "stpe")
    for version in (-1, 10**30):
        response = post(client, "ext-1", "retry_step", expected_version=version)
        assert_problem(response, 400, "expected_version")
    assert AuditEntry.objects.count() == 0


def test_unknown_action_and_saga_are_404_naming_them() -> None:
    failed_external()
    client, _ = person("operator")
    assert_problem(post(client, "ext-1", "explode", expected_version=1), 404, "action")
    # not a lowercase name, or none at all (these were 405s from the saga detail route)
    assert_problem(post(client, "ext-1", "EXPLODE", expected_version=1), 404, "action")
    assert_problem(post(client, "ext-1", "", expected_version=1), 404, "action")
    assert_problem(post(client, "nope", "retry_step", expected_version=1), 404, "saga_id")
    assert AuditEntry.objects.count() == 0


def test_actions_take_json_only() -> None:
    failed_external()
    client, _ = person("operator")
    response = client.post(
        "/api/v1/sagas/ext-1/actions/retry_step",
        "reason=x&expected_version=1",
        content_type="application/x-www-form-urlencoded",
    )
    assert_problem(response, 415)
    assert commands() == []


def test_a_saga_id_with_slashes_reaches_the_action() -> None:
    failed_external("tenant/7/order-1")
    client, _ = person("operator")
    response = post(client, "tenant/7/order-1", "retry_step")
    assert response.status_code == 202, response.content
    assert response.json()["saga_id"] == "tenant/7/order-1"


# -- resubmission ---------------------------------------------------------------------------


def test_resubmitting_a_request_id_returns_the_first_answer_and_dispatches_once() -> None:
    saga = failed_external()
    client, _ = person("operator")
    body = {"request_id": "req-1", "expected_version": saga.version}

    first = post(client, "ext-1", "retry_step", **body)
    again = post(client, "ext-1", "retry_step", **body)  # the version it saw first

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == {**first.json(), "resubmitted": True}
    assert len(commands()) == 1
    assert OperatorAction.objects.count() == 1
    assert AuditEntry.objects.count() == 1
    assert version("ext-1") == saga.version + 1
    # the same request id for another action is a conflict naming it
    assert_problem(post(client, "ext-1", "compensate", request_id="req-1"), 409, "request_id")


@pytest.mark.django_db(transaction=True)
def test_two_operators_at_once_one_wins_one_gets_409(postgres: None) -> None:
    saga = failed_external("race-1")
    clients = [person("operator")[0], person("operator")[0]]
    barrier = threading.Barrier(2)
    responses: list[Any] = []

    def go(client: Client) -> None:
        try:
            barrier.wait()
            responses.append(post(client, "race-1", "compensate", expected_version=saga.version))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=go, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(r.status_code for r in responses) == [202, 409]
    loser = next(r for r in responses if r.status_code == 409)
    assert loser.json()["current_version"] == saga.version + 1
    assert len(commands()) == 1
    assert [e.outcome for e in AuditEntry.objects.filter(outcome="dispatched")] == ["dispatched"]
    assert AuditEntry.objects.exclude(outcome="dispatched").get().outcome == "conflict"
    assert version("race-1") == saga.version + 1


# -- the audit log --------------------------------------------------------------------------

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def audit_rows() -> list[AuditEntry]:
    """Six entries a minute apart (index 5 is the newest)."""
    specs = [
        ("otto", "retry_step", "s-1", "dispatched"),
        ("otto", "compensate", "s-2", "conflict"),
        ("ada", "terminate", "s-1", "done"),
        ("vera", "retry_step", "s-3", "forbidden"),
        ("otto", "retry_step", "s-1", "done"),
        ("ada", "cancel", "s-2", "done"),
    ]
    return [
        AuditEntry.objects.create(
            at=T0 + timedelta(minutes=i),
            actor=actor,
            role="operator",
            action=action,
            saga_id=saga_id,
            reason=f"reason {i}",
            outcome=outcome,
            state_before={"status": "failed", "version": i},
            state_after={"status": "running", "version": i + 1},
        )
        for i, (actor, action, saga_id, outcome) in enumerate(specs)
    ]


def ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.content
    return [e["id"] for e in response.json()["results"]]


def test_the_audit_log_newest_first_with_every_field(audit_rows: list[AuditEntry]) -> None:
    viewer, _ = person("viewer")
    response = viewer.get("/api/v1/audit")
    assert ids(response) == [e.pk for e in reversed(audit_rows)]
    newest = response.json()["results"][0]
    assert newest == {
        "id": audit_rows[5].pk,
        "at": "2026-03-01T12:05:00Z",
        "actor": "ada",
        "role": "operator",
        "action": "cancel",
        "saga_id": "s-2",
        "step": "",
        "reason": "reason 5",
        "outcome": "done",
        "detail": "",
        "state_before": {"status": "failed", "version": 5},
        "state_after": {"status": "running", "version": 6},
        "operator_action_id": None,
    }
    assert response.json()["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("actor=otto", [4, 1, 0]),
        ("action=retry_step", [4, 3, 0]),
        ("saga_id=s-2", [5, 1]),
        ("outcome=done", [5, 4, 2]),
        ("since=2026-03-01T12:02:00Z", [5, 4, 3, 2]),
        ("until=2026-03-01T12:02:00Z", [1, 0]),
        ("since=2026-03-01T13:01:00%2B01:00&until=2026-03-01T12:04:00Z", [3, 2, 1]),
        ("actor=otto&action=retry_step&saga_id=s-1&outcome=done", [4]),
        ("actor=nobody", []),
    ],
)
def test_audit_filters(audit_rows: list[AuditEntry], query: str, expected: list[int]) -> None:
    client, _ = person("operator")
    assert ids(client.get(f"/api/v1/audit?{query}")) == [audit_rows[i].pk for i in expected]


def test_audit_keyset_pages_cover_everything_once(audit_rows: list[AuditEntry]) -> None:
    client, _ = person("operator")
    # two entries at the same instant still page apart
    AuditEntry.objects.create(at=audit_rows[5].at, actor="x", action="pause", saga_id="s-9")
    seen: list[int] = []
    url = "/api/v1/audit?limit=2"
    pages = 0
    while True:
        body = client.get(url).json()
        seen += [e["id"] for e in body["results"]]
        pages += 1
        if not body["next_cursor"]:
            break
        url = f"/api/v1/audit?limit=2&cursor={body['next_cursor']}"
    assert pages == 4
    assert len(seen) == len(set(seen)) == 7
    assert seen == list(AuditEntry.objects.order_by("-at", "-pk").values_list("pk", flat=True))


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("until=2026-03-01T12:00:00", "until"),  # no offset
        ("cursor=bogus", "cursor"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=many", "limit"),
        ("format=xml", "format"),
        ("format=csv&since=never", "since"),
        ("since=9999-12-31T23:59:59-23:59", "since"),  # past datetime's range: was a 500
        ("format=csv&since=9999-12-31T23:59:59-23:59", "since"),  # was a 200 cut short
        ("format=jsonl&until=0001-01-01T00:00:00%2B01:00", "until"),
    ],
)
def test_bad_audit_queries_are_400_naming_the_parameter(query: str, field: str) -> None:
    client, _ = person("operator")
    assert_problem(client.get(f"/api/v1/audit?{query}"), 400, field)


def _csv_rows(response: Any) -> list[dict[str, str]]:
    assert response.streaming
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_audit_csv_export_streams_everything_matching(audit_rows: list[AuditEntry]) -> None:
    client, _ = person("viewer")
    AuditEntry.objects.create(
        at=T0 + timedelta(minutes=9), actor="otto", action="skip_step", saga_id="s-1",
        reason='=HYPERLINK("http://evil")', outcome="done",
    )  # fmt: skip

    response = client.get("/api/v1/audit?format=csv&actor=otto&limit=1")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    disposition = response["Content-Disposition"]
    assert disposition.startswith('attachment; filename="sagaadmin-audit-')
    assert disposition.endswith('.csv"')
    rows = _csv_rows(response)
    # every matching row (limit and cursor do not apply), newest first
    assert [int(r["id"]) for r in rows] == list(
        AuditEntry.objects.filter(actor="otto").order_by("-at").values_list("pk", flat=True)
    )
    assert len(rows) == 4
    assert list(rows[0]) == [
        "id",
        "at",
        "actor",
        "role",
        "action",
        "saga_id",
        "step",
        "reason",
        "outcome",
        "detail",
        "state_before",
        "state_after",
        "operator_action_id",
    ]
    assert rows[0]["reason"] == '\'=HYPERLINK("http://evil")'  # a text, not a formula
    oldest = rows[-1]
    assert (oldest["action"], oldest["saga_id"], oldest["outcome"]) == (
        "retry_step",
        "s-1",
        "dispatched",
    )
    assert json.loads(oldest["state_after"]) == {"status": "running", "version": 1}
    assert oldest["at"] == "2026-03-01T12:00:00Z"


def test_audit_jsonl_export_has_the_pages_shape(audit_rows: list[AuditEntry]) -> None:
    client, _ = person("operator")
    response = client.get("/api/v1/audit?format=jsonl&saga_id=s-1")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/jsonl; charset=utf-8"
    assert response["Content-Disposition"].endswith('.jsonl"')
    lines = b"".join(response.streaming_content).decode().splitlines()
    exported = [json.loads(line) for line in lines]
    assert exported == client.get("/api/v1/audit?saga_id=s-1").json()["results"]
    assert [e["id"] for e in exported] == [audit_rows[i].pk for i in (4, 2, 0)]


def test_an_export_larger_than_a_batch_has_every_entry_once() -> None:
    AuditEntry.objects.bulk_create(
        AuditEntry(at=T0 + timedelta(seconds=i // 3), actor="bulk", action="cancel", saga_id="b")
        for i in range(1234)
    )
    client, _ = person("operator")
    rows = _csv_rows(client.get("/api/v1/audit?format=csv"))
    assert len(rows) == len({r["id"] for r in rows}) == 1234
    assert [int(r["id"]) for r in rows] == list(
        AuditEntry.objects.order_by("-at", "-pk").values_list("pk", flat=True)
    )


def test_under_asgi_the_export_is_an_async_stream(audit_rows: list[AuditEntry]) -> None:
    _, user = person("operator")

    async def fetch() -> tuple[Any, bytes]:
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get("/api/v1/audit?format=jsonl")
        assert response.is_async  # served without collecting the whole file first
        body = b"".join([chunk async for chunk in response.streaming_content])
        return response, body

    response, body = async_to_sync(fetch)()
    assert response.status_code == 200
    assert [json.loads(line)["id"] for line in body.decode().splitlines()] == [
        e.pk for e in reversed(audit_rows)
    ]


def test_actions_write_the_audit_log_the_api_shows() -> None:
    saga = failed_external()
    operator, user = person("operator")
    viewer, _ = person("viewer")
    post(operator, "ext-1", "retry_step", reason="card fixed")
    post(viewer, "ext-1", "compensate", expected_version=saga.version + 1)

    entries = operator.get("/api/v1/audit?saga_id=ext-1").json()["results"]

    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("compensate", "forbidden"),
        ("retry_step", "dispatched"),
    ]
    assert entries[1]["actor"] == user.username and entries[1]["reason"] == "card fixed"
    assert entries[1]["operator_action_id"] == OperatorAction.objects.get(action="retry_step").pk
    assert entries[1]["state_before"]["version"] == saga.version
    assert entries[1]["state_after"]["version"] == saga.version + 1


# -- the CLI ---------------------------------------------------------------------------------


def cli(*args: str) -> dict[str, Any]:
    out = io.StringIO()
    call_command("saga_action", *args, stdout=out)
    return dict(json.loads(out.getvalue()))


def test_the_cli_runs_an_action_and_prints_the_answer() -> None:
    saga = failed_external()
    _, user = person("operator")

    answer = cli(
        "retry_step",
        "ext-1",
        "--reason",
        "from the shell",
        "--as",
        user.username,
        "--step",
        "charge",
        "--expected-version",
        str(saga.version),
        "--request-id",
        "cli-1",
    )

    assert (answer["status"], answer["saga_id"], answer["version"]) == (
        "dispatched",
        "ext-1",
        saga.version + 1,
    )
    [command] = commands()
    assert (command["reason"], command["requested_by"]) == ("from the shell", user.username)
    entry = AuditEntry.objects.get()
    assert (entry.actor, entry.outcome, entry.reason) == (
        user.username,
        "dispatched",
        "from the shell",
    )
    # the same request id again: the first answer, nothing dispatched twice
    again = cli(
        "retry_step", "ext-1", "--reason", "again", "--as", user.username, "--request-id", "cli-1"
    )
    assert again == {**answer, "resubmitted": True}
    assert len(commands()) == 1


def test_the_cli_acts_on_an_orchestrated_saga_with_data() -> None:
    waiting_retry("cli-orc")
    _, admin = person("admin")
    answer = cli(
        "rerun", "cli-orc", "--reason", "fix amount", "--as", admin.username,
        "--step", "create_order", "--data", '{"amount": 11}',
    )  # fmt: skip
    Worker().drain()
    assert answer["status"] == "done" and answer["orchestrated"]
    assert run_of("cli-orc").status == "completed" and run_of("cli-orc").data == {"amount": 11}


@pytest.mark.parametrize(
    ("role", "args", "message"),
    [
        ("viewer", ["retry_step", "ext-1"], "role: your role may not retry step"),
        ("operator", ["terminate", "ext-1"], "role: your role may not terminate"),
        ("operator", ["cancel", "ext-1", "--expected-version", "0"], "version: the saga changed"),
        ("operator", ["explode", "ext-1"], "action: no action 'explode'"),
        ("operator", ["retry_step", "nope"], "saga_id: no saga nope"),
        ("operator", ["retry_step", "ext-1", "--reason", " "], "reason: say why"),
        ("operator", ["retry_step", "ext-1", "--step", "ship"], "step: name the step"),
        ("operator", ["retry_step", "ext-1", "--data", "{}"], "data: only rerun takes data"),
        ("admin", ["rerun", "ext-1", "--data", "[1]"], "data: a JSON object"),
        ("admin", ["rerun", "ext-1", "--data", "{x"], "data: not JSON"),
    ],
)
def test_the_cli_refuses_with_field_and_message(role: str, args: list[str], message: str) -> None:
    failed_external()
    _, user = person(role)
    if "--reason" not in args:
        args = [*args, "--reason", "because"]
    with pytest.raises(CommandError) as caught:
        cli(*args, "--as", user.username)
    assert str(caught.value).startswith(message), str(caught.value)
    assert commands() == []
    audited = message.startswith(("role", "version", "step"))
    assert AuditEntry.objects.count() == (1 if audited else 0)


def test_the_cli_needs_a_known_user() -> None:
    failed_external()
    with pytest.raises(CommandError, match="as: no user 'ghost'"):
        cli("retry_step", "ext-1", "--reason", "x", "--as", "ghost")
    assert AuditEntry.objects.count() == 0


# -- the schema ------------------------------------------------------------------------------


def test_the_openapi_schema_lists_the_action_endpoints() -> None:
    client, _ = person("viewer")
    schema = client.get("/api/v1/schema?format=json").json()
    paths = schema["paths"]
    run = paths["/api/v1/sagas/{saga_id}/actions/{action}"]["post"]
    assert {"200", "202", "400", "403", "404", "409"} <= set(run["responses"])
    assert PROBLEM in run["responses"]["409"]["content"]
    assert set(paths["/api/v1/sagas/{saga_id}/actions"]) == {"get"}
    assert set(paths["/api/v1/actions/{action_id}"]) == {"get"}
    audit = paths["/api/v1/audit"]["get"]
    assert {"application/json", "text/csv", "application/jsonl"} <= set(
        audit["responses"]["200"]["content"]
    )
    assert {p["name"] for p in audit["parameters"]} >= {
        "actor",
        "action",
        "saga_id",
        "outcome",
        "since",
        "until",
        "cursor",
        "limit",
        "format",
    }
    request = schema["components"]["schemas"]["ActionRequest"]
    assert set(request["required"]) == {"reason", "expected_version"}


def test_an_action_awaiting_a_second_operator_is_202_with_nothing_dispatched(settings) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, "TWO_PERSON_ACTIONS": ["retry_step"]}
    waiting_retry("two-1")
    client, _ = person("operator")

    response = post(client, "two-1", "retry_step")

    assert response.status_code == 202, response.content
    assert response.json()["status"] == "awaiting_approval"
    progress = client.get(response["Location"]).json()
    assert progress["status"] == "awaiting_approval"
    Worker().drain()
    assert run_of("two-1").epoch == 1  # the retry waits for the approval


def test_a_number_too_long_to_parse_is_a_plain_malformed_request() -> None:
    failed_external()
    client, _ = person("operator")
    body = '{"reason": "x", "expected_version": ' + "9" * 5000 + "}"
    response = client.post(
        "/api/v1/sagas/ext-1/actions/retry_step", body, content_type="application/json"
    )
    problem = assert_problem(response, 400)
    assert "4300 digits" in problem["detail"] and "set_int_max_str_digits" not in problem["detail"]


def test_an_export_that_breaks_mid_stream_gives_its_connection_back(monkeypatch) -> None:
    """Under ASGI a broken stream gets no request_finished: the export itself closes the
    thread's (pooled) connection, or each such export would keep one."""
    import asyncio

    from django.db import DatabaseError

    from tracking import audit

    closed: list[bool] = []
    monkeypatch.setattr(audit, "_connection_close", lambda: closed.append(True))
    monkeypatch.setattr(
        audit, "audit_export_batch", lambda **kw: (_ for _ in ()).throw(DatabaseError("gone"))
    )
    response = audit.audit_export(filters=audit.AuditFilter(), fmt="csv", asgi=True)

    async def drain() -> None:
        async for _ in response.streaming_content:
            pass

    with pytest.raises(DatabaseError):
        asyncio.run(drain())
    assert closed == [True]
