"""/api/v1/incidents and /api/v1/saga-types: list, show, acknowledge, resolve, thresholds, roles."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from outbox.models import OutboxMessage
from tests.conftest import role_group
from tracking.detector import detect_pass
from tracking.models import Incident, Saga, SagaType, StepStatDelta
from tracking.policy import policy_invalidate
from tracking.rollups import STEP_BUCKET, bin_upper_ms, duration_bin, floor_time

PROBLEM = "application/problem+json"
_events = itertools.count()


@pytest.fixture(autouse=True)
def fresh_policy() -> Iterator[None]:
    """Ingest caches the thresholds per process; no test may see another's."""
    policy_invalidate()
    yield
    policy_invalidate()


def person(role: str | None, username: str) -> Client:
    user = get_user_model().objects.create_user(username, password="pw-x-12345")
    if role:
        user.groups.add(role_group(role))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer(db: None) -> Client:
    return person("viewer", "vera")


@pytest.fixture
def operator(db: None) -> Client:
    return person("operator", "otto")


@pytest.fixture
def admin(db: None) -> Client:
    return person("admin", "ada")


def event(saga_id: str, type_: str, **fields: Any) -> dict[str, Any]:
    """A protocol event that occurred just now (no clock-skew flag)."""
    body = {
        "id": f"{saga_id}-{next(_events)}",
        "saga_id": saga_id,
        "type": type_,
        "occurred_at": timezone.now().isoformat(),
    }
    body.update(fields)
    return body


def started(saga_id: str, saga_type: str = "order") -> list[dict[str, Any]]:
    return [
        event(saga_id, "saga.started", saga_type=saga_type),
        event(saga_id, "step.started", step="charge"),
    ]


def ingest(api: Any, events: list[dict[str, Any]]) -> None:
    body = api.batch(events).json()
    assert body["rejected"] == 0, body


@pytest.fixture
def reported(api: Any) -> None:
    """order-1 failed for good, order-2's compensation failed, refund-1 runs."""
    ingest(
        api,
        [
            *started("order-1"),
            event(
                "order-1",
                "step.failed",
                step="charge",
                error={"type": "CardDeclined", "message": "no", "retryable": False},
            ),
            event("order-1", "saga.failed"),
            *started("order-2"),
            event("order-2", "step.failed", step="charge"),
            event("order-2", "saga.compensation_failed"),
            *started("refund-1", saga_type="refund"),
        ],
    )


@pytest.fixture
def t1(reported: None) -> datetime:
    """The first detector pass: just after the events arrived."""
    return timezone.now()


@pytest.fixture
def incidents(reported: None, t1: datetime) -> dict[str, int]:
    """Three incidents by saga id: two opened at t1, one (stuck) 20 minutes later."""
    assert detect_pass(now=t1).opened == 2
    assert detect_pass(now=t1 + timedelta(minutes=20)).opened == 1
    return {i.saga.saga_id: i.pk for i in Incident.objects.select_related("saga")}


def saga_ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.content
    return [i["saga_id"] for i in response.json()["results"]]


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    if field is not None:
        assert [e["field"] for e in body["errors"]] == [field]
    return body


def messages(type_: str) -> list[dict[str, Any]]:
    rows = OutboxMessage.objects.filter(type=type_).order_by("seq")
    return [json.loads(m.payload) for m in rows]


# -- list and show ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["refund-1", "order-2", "order-1"]),
        ("state=open", ["refund-1", "order-2", "order-1"]),
        ("state=all", ["refund-1", "order-2", "order-1"]),
        ("state=acknowledged", []),
        ("state=resolved", []),
        ("kind=stuck", ["refund-1"]),
        ("kind=compensation_failed", ["order-2"]),
        ("kind=in_doubt", []),
        ("saga_type=order", ["order-2", "order-1"]),
        ("saga_id=order-1", ["order-1"]),
        ("saga_id=order", []),
        ("saga_type=order&kind=retries_exhausted", ["order-1"]),
    ],
)
def test_list_filters(user_client, incidents, query, expected) -> None:
    assert saga_ids(user_client.get(f"/api/v1/incidents?{query}")) == expected


def test_list_by_state_follows_the_lifecycle(operator, incidents) -> None:
    # given one incident acknowledged and one resolved
    operator.post(f"/api/v1/incidents/{incidents['order-1']}/acknowledge")
    operator.post(
        f"/api/v1/incidents/{incidents['order-2']}/resolve",
        {"note": "refunded by hand"},
        content_type="application/json",
    )

    def listed(state: str) -> list[str]:
        return saga_ids(operator.get(f"/api/v1/incidents?state={state}"))

    # then each state lists its own, and the default hides the resolved one
    assert listed("open") == ["refund-1"]
    assert listed("acknowledged") == ["order-1"]
    assert listed("resolved") == ["order-2"]
    assert listed("unresolved") == ["refund-1", "order-1"]
    assert saga_ids(operator.get("/api/v1/incidents")) == ["refund-1", "order-1"]
    assert listed("all") == ["refund-1", "order-2", "order-1"]


def test_keyset_pages(user_client, incidents) -> None:
    first = user_client.get("/api/v1/incidents?limit=2").json()
    assert [i["saga_id"] for i in first["results"]] == ["refund-1", "order-2"]
    assert first["next_cursor"]
    second = user_client.get(f"/api/v1/incidents?limit=2&cursor={first['next_cursor']}").json()
    assert [i["saga_id"] for i in second["results"]] == ["order-1"]
    assert second["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=bogus", "state"),
        ("kind=slow", "kind"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=x", "limit"),
        ("cursor=garbage", "cursor"),
    ],
)
def test_bad_list_parameters_are_problem_json_naming_the_parameter(
    user_client, incidents, query, field
) -> None:
    assert_problem(user_client.get(f"/api/v1/incidents?{query}"), 400, field)


def test_one_incident_with_its_evidence_and_a_link_to_the_saga(user_client, incidents, t1) -> None:
    body = user_client.get(f"/api/v1/incidents/{incidents['order-2']}").json()
    assert body["id"] == incidents["order-2"]
    assert body["saga_id"] == "order-2"
    assert body["saga_type"] == "order"
    assert body["kind"] == "compensation_failed"
    assert body["status"] == "open"
    assert body["reason"] == "the saga reported saga.compensation_failed"
    assert [e["type"] for e in body["evidence"]] == ["saga.compensation_failed"]
    assert body["evidence"][0]["service"] == "payment"
    assert body["evidence"][0]["event_id"].startswith("order-2-")
    assert body["evidence"][0]["occurred_at"].endswith("Z")
    assert body["opened_at"] == t1.isoformat().replace("+00:00", "Z")
    for unset in ("acknowledged_at", "resolved_at"):
        assert body[unset] is None
    for unset in ("acknowledged_by", "acknowledge_note", "resolved_by", "resolution"):
        assert body[unset] == ""
    # the link leads to the saga in the read API
    assert body["saga_url"] == "http://testserver/api/v1/sagas/order-2"
    saga = user_client.get(body["saga_url"].removeprefix("http://testserver"))
    assert saga.json()["saga_id"] == "order-2"


def test_an_unknown_incident_is_404_problem(user_client, operator, incidents) -> None:
    missing = max(incidents.values()) + 1
    assert_problem(user_client.get(f"/api/v1/incidents/{missing}"), 404)
    assert_problem(user_client.get("/api/v1/incidents/abc"), 404)
    for action in ("acknowledge", "resolve"):
        response = operator.post(
            f"/api/v1/incidents/{missing}/{action}", {"note": "x"}, content_type="application/json"
        )
        assert "No incident" in assert_problem(response, 404)["detail"]


# -- acknowledge and resolve ------------------------------------------------------------


def test_acknowledge_then_resolve(operator, incidents) -> None:
    pk = incidents["order-2"]
    assert messages("sagaadmin.incident.acknowledged") == []
    # when an operator acknowledges it
    response = operator.post(
        f"/api/v1/incidents/{pk}/acknowledge",
        {"note": "looking at the refund"},
        content_type="application/json",
    )
    # then the answer and the row say so, and the alert message is in the outbox
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "acknowledged"
    assert response.json()["acknowledged_by"] == "otto"
    row = Incident.objects.get(pk=pk)
    assert row.status == "acknowledged"
    assert row.acknowledged_by == "otto"
    assert row.acknowledge_note == "looking at the refund"
    assert row.acknowledged_at is not None
    [acked] = messages("sagaadmin.incident.acknowledged")
    assert acked["incident_id"] == pk
    assert acked["acknowledged_by"] == "otto"
    assert Saga.objects.get(saga_id="order-2").open_incidents == ",compensation_failed,"
    version = Saga.objects.get(saga_id="order-2").version

    # when the operator resolves it with a note
    response = operator.post(
        f"/api/v1/incidents/{pk}/resolve",
        {"note": "refunded by hand"},
        content_type="application/json",
    )
    # then it is resolved by the operator, the saga loses its badge, and a message is written
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["resolution"], body["resolved_by"]) == (
        "resolved",
        "operator",
        "otto",
    )
    assert body["resolution_note"] == "refunded by hand"
    assert body["acknowledge_note"] == "looking at the refund"
    row.refresh_from_db()
    assert row.status == "resolved"
    assert row.resolved_at is not None
    assert row.resolution == "operator"
    saga = Saga.objects.get(saga_id="order-2")
    assert saga.open_incidents == ""
    assert saga.version == version + 1
    [resolved] = messages("sagaadmin.incident.resolved")
    assert resolved["incident_id"] == pk
    assert resolved["note"] == "refunded by hand"
    # the other incidents are untouched
    assert Incident.objects.filter(status="open").count() == 2


def test_an_admin_may_resolve_without_acknowledging(admin, incidents) -> None:
    pk = incidents["refund-1"]
    response = admin.post(
        f"/api/v1/incidents/{pk}/resolve", {"note": "restarted"}, content_type="application/json"
    )
    assert response.status_code == 200, response.content
    assert Incident.objects.get(pk=pk).resolved_by == "ada"


def test_acknowledging_twice_changes_nothing(operator, admin, incidents) -> None:
    url = f"/api/v1/incidents/{incidents['order-1']}/acknowledge"
    assert operator.post(url).status_code == 200
    second = admin.post(url, {"note": "me too"}, content_type="application/json")
    assert second.status_code == 200
    assert second.json()["acknowledged_by"] == "otto"
    assert Incident.objects.get(pk=incidents["order-1"]).acknowledge_note == ""
    assert len(messages("sagaadmin.incident.acknowledged")) == 1


def test_resolving_twice_is_409_problem(operator, incidents) -> None:
    url = f"/api/v1/incidents/{incidents['order-1']}"
    body = {"note": "done"}
    assert operator.post(f"{url}/resolve", body, content_type="application/json").status_code == 200
    # when it is resolved again, or acknowledged after resolving
    again = operator.post(f"{url}/resolve", {"note": "again"}, content_type="application/json")
    late_ack = operator.post(f"{url}/acknowledge")
    # then both are conflicts naming the status, and nothing changed
    problem = assert_problem(again, 409, "status")
    assert problem["type"].endswith("/conflict")
    assert "resolved already" in problem["detail"]
    assert_problem(late_ack, 409, "status")
    assert Incident.objects.get(pk=incidents["order-1"]).resolution_note == "done"
    assert len(messages("sagaadmin.incident.resolved")) == 1
    assert messages("sagaadmin.incident.acknowledged") == []


@pytest.mark.parametrize(
    "body",
    [
        None,
        {},
        {"note": ""},
        {"note": "   "},
        {"note": None},
        {"note": ["x"]},
        {"note": "x" * 4001},
    ],
)
def test_resolve_needs_a_note(operator, incidents, body) -> None:
    url = f"/api/v1/incidents/{incidents['order-1']}/resolve"
    if body is None:
        response = operator.post(url)
    else:
        response = operator.post(url, body, content_type="application/json")
    assert_problem(response, 400, "note")
    assert Incident.objects.get(pk=incidents["order-1"]).status == "open"
    assert messages("sagaadmin.incident.resolved") == []


def test_acknowledge_refuses_a_note_too_long(operator, incidents) -> None:
    url = f"/api/v1/incidents/{incidents['order-1']}/acknowledge"
    response = operator.post(url, {"note": "x" * 4001}, content_type="application/json")
    assert_problem(response, 400, "note")
    assert Incident.objects.get(pk=incidents["order-1"]).status == "open"


@pytest.mark.parametrize("role", ["viewer"])
def test_viewers_can_read_but_not_act(incidents, role) -> None:
    client = person(role, "watcher")
    pk = incidents["order-1"]
    # they can read ...
    assert client.get(f"/api/v1/incidents/{pk}").status_code == 200
    # ... but not act
    for action in ("acknowledge", "resolve"):
        response = client.post(
            f"/api/v1/incidents/{pk}/{action}", {"note": "x"}, content_type="application/json"
        )
        assert "operators and admins" in assert_problem(response, 403)["detail"]
    assert Incident.objects.get(pk=pk).status == "open"
    assert messages("sagaadmin.incident.acknowledged") == []
    assert messages("sagaadmin.incident.resolved") == []


def test_a_session_post_needs_the_csrf_token(incidents) -> None:
    user = get_user_model().objects.create_user("carla", password="pw-x-12345")
    user.groups.add(role_group("operator"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    url = f"/api/v1/incidents/{incidents['order-1']}/acknowledge"
    assert_problem(client.post(url), 403)
    # with the token from the cookie, the same request goes through
    client.get("/login/")
    token = client.cookies["csrftoken"].value
    assert client.post(url, HTTP_X_CSRFTOKEN=token).status_code == 200


# -- saga types --------------------------------------------------------------------------


@pytest.fixture
def saga_types(api: Any) -> None:
    """order: a finished saga (charge took ~0 ms), a running one; refund: a running one.

    Plus 150 learned attempts of order/reserve, enough for a learned bound.
    """
    ingest(
        api,
        [
            *started("order-done"),
            event("order-done", "step.succeeded", step="charge"),
            event("order-done", "saga.completed"),
            *started("order-run"),
            *started("refund-run", saga_type="refund"),
        ],
    )
    # rows are created after the ingest commits; a test's transaction never commits
    for name in ("order", "refund"):
        SagaType.objects.get_or_create(name=name)
    StepStatDelta.objects.create(
        bucket=floor_time(timezone.now(), STEP_BUCKET),
        saga_type="order",
        step="reserve",
        bin=duration_bin(200),
        count=150,
        failures=3,
    )


def defaults() -> dict[str, Any]:
    cfg = settings.SAGAADMIN
    return {
        "stuck_after_seconds": cfg["STUCK_AFTER_SECONDS"],
        "max_attempts": cfg["MAX_ATTEMPTS"],
        "in_doubt_after_seconds": cfg["IN_DOUBT_AFTER_SECONDS"],
        "step_thresholds": {},
    }


def test_saga_types_with_default_thresholds_and_learned_steps(user_client, saga_types) -> None:
    response = user_client.get("/api/v1/saga-types")
    assert response.status_code == 200, response.content
    types = response.json()["results"]
    assert [t["name"] for t in types] == ["order", "refund"]
    order = types[0]
    assert order["thresholds"] == {
        "stuck_after_seconds": None,
        "max_attempts": None,
        "in_doubt_after_seconds": None,
        "step_thresholds": {},
    }
    assert order["effective"] == defaults()
    charge, reserve = order["steps"]
    # one finished attempt: learned, but too few samples for a bound
    assert (charge["step"], charge["count"], charge["failures"]) == ("charge", 1, 0)
    assert charge["p99_ms"] is not None
    assert (charge["slow_after_seconds"], charge["source"]) == (None, None)
    # 150 attempts: a learned bound of the p99 times the configured multiple
    p99 = round(bin_upper_ms(duration_bin(200)), 1)
    assert (reserve["step"], reserve["count"], reserve["failures"]) == ("reserve", 150, 3)
    assert reserve["p99_ms"] == p99
    assert reserve["source"] == "learned"
    multiple = settings.SAGAADMIN["SLOW_STEP_P99_MULTIPLE"]
    assert reserve["slow_after_seconds"] == pytest.approx(p99 * multiple / 1000, abs=0.001)
    # the refund type has no finished step yet
    assert types[1]["steps"] == []
    assert user_client.get("/api/v1/saga-types/refund").json() == types[1]


def test_an_unknown_saga_type_is_404_problem(user_client, admin, saga_types) -> None:
    assert_problem(user_client.get("/api/v1/saga-types/nope"), 404)
    response = admin.patch(
        "/api/v1/saga-types/nope", {"max_attempts": 3}, content_type="application/json"
    )
    assert_problem(response, 404)


def test_an_admin_changes_thresholds_and_the_types_open_sagas_are_due(admin, saga_types) -> None:
    now = timezone.now()
    before = {s.saga_id: s.watch_at for s in Saga.objects.all()}
    assert before["order-run"] is not None and before["order-run"] > now + timedelta(minutes=10)
    assert before["order-done"] is None
    # nothing is due two minutes from now under the default thresholds
    assert detect_pass(now=now + timedelta(minutes=2)).examined == 0

    # when an admin shortens the stuck threshold and configures a step threshold
    response = admin.patch(
        "/api/v1/saga-types/order",
        {"stuck_after_seconds": 60, "step_thresholds": {"charge": 30}},
        content_type="application/json",
    )

    # then the answer shows the type's own and the effective thresholds
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["thresholds"] == {
        "stuck_after_seconds": 60,
        "max_attempts": None,
        "in_doubt_after_seconds": None,
        "step_thresholds": {"charge": 30},
    }
    assert body["effective"] == {
        **defaults(),
        "stuck_after_seconds": 60,
        "step_thresholds": {"charge": 30},
    }
    charge = next(s for s in body["steps"] if s["step"] == "charge")
    assert (charge["slow_after_seconds"], charge["source"]) == (30, "configured")
    assert body["updated_by"] == "ada"
    row = SagaType.objects.get(name="order")
    assert (row.stuck_after_seconds, row.step_thresholds, row.updated_by) == (
        60,
        {"charge": 30},
        "ada",
    )
    # the type's running saga is due now; the finished one and the other type are not touched
    after = {s.saga_id: s.watch_at for s in Saga.objects.all()}
    assert after["order-run"] == row.updated_at
    assert after["order-done"] is None
    assert after["refund-run"] == before["refund-run"]
    # and the detector applies the new threshold on its next pass
    detect_pass(now=now + timedelta(minutes=2))
    [stuck] = Incident.objects.filter(kind="stuck")
    assert stuck.saga.saga_id == "order-run"


def test_patch_changes_only_the_fields_given(admin, saga_types) -> None:
    url = "/api/v1/saga-types/order"
    admin.patch(
        url, {"max_attempts": 3, "stuck_after_seconds": 60}, content_type="application/json"
    )
    response = admin.patch(url, {"stuck_after_seconds": None}, content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["thresholds"]["max_attempts"] == 3
    assert response.json()["thresholds"]["stuck_after_seconds"] is None
    assert response.json()["effective"]["stuck_after_seconds"] == defaults()["stuck_after_seconds"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"stuck_after_seconds": 0}, "stuck_after_seconds"),
        ({"stuck_after_seconds": 1.5}, "stuck_after_seconds"),
        ({"stuck_after_seconds": True}, "stuck_after_seconds"),
        ({"in_doubt_after_seconds": "soon"}, "in_doubt_after_seconds"),
        ({"max_attempts": 5000}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"step_thresholds": {"charge": -5}}, "step_thresholds.charge"),
        ({"step_thresholds": {"charge": 30, "ship": "x"}}, "step_thresholds.ship"),
        ({"step_thresholds": [30]}, "step_thresholds"),
        ({"step_thresholds": {"": 30}}, "step_thresholds"),
        ({"bogus": 1}, "bogus"),
        ([{"max_attempts": 3}], "request"),
    ],
)
def test_bad_thresholds_are_400_naming_the_field(admin, saga_types, body, field) -> None:
    response = admin.patch("/api/v1/saga-types/order", body, content_type="application/json")
    assert_problem(response, 400, field)
    row = SagaType.objects.get(name="order")
    assert (row.stuck_after_seconds, row.max_attempts, row.step_thresholds) == (None, None, {})
    assert row.updated_by == ""


def test_patch_takes_json_only(admin, saga_types) -> None:
    response = admin.patch(
        "/api/v1/saga-types/order",
        "max_attempts=3",
        content_type="application/x-www-form-urlencoded",
    )
    assert_problem(response, 415)
    assert SagaType.objects.get(name="order").max_attempts is None


@pytest.mark.parametrize("role", ["operator", "viewer"])
def test_only_admins_change_thresholds(saga_types, role) -> None:
    client = person(role, "someone")
    response = client.patch(
        "/api/v1/saga-types/order", {"max_attempts": 3}, content_type="application/json"
    )
    assert "Only admins" in assert_problem(response, 403)["detail"]
    assert SagaType.objects.get(name="order").max_attempts is None
    assert client.get("/api/v1/saga-types/order").status_code == 200


# -- who may call -------------------------------------------------------------------------


def test_people_without_a_role_neither_read_nor_act(incidents, saga_types) -> None:
    client = person(None, "nobody")
    pk = incidents["order-1"]
    for response in (
        client.get("/api/v1/incidents"),
        client.get(f"/api/v1/incidents/{pk}"),
        client.post(
            f"/api/v1/incidents/{pk}/resolve", {"note": "x"}, content_type="application/json"
        ),
        client.get("/api/v1/saga-types"),
        client.patch(
            "/api/v1/saga-types/order", {"max_attempts": 3}, content_type="application/json"
        ),
    ):
        assert "with a role" in assert_problem(response, 403)["detail"]
    assert Incident.objects.get(pk=pk).status == "open"


def test_anonymous_callers_are_refused(incidents, saga_types) -> None:
    client = Client()
    pk = incidents["order-1"]
    calls = [
        client.get("/api/v1/incidents"),
        client.get(f"/api/v1/incidents/{pk}"),
        client.post(f"/api/v1/incidents/{pk}/acknowledge"),
        client.post(f"/api/v1/incidents/{pk}/resolve", {"note": "x"}),
        client.get("/api/v1/saga-types"),
        client.get("/api/v1/saga-types/order"),
        client.patch(
            "/api/v1/saga-types/order", {"max_attempts": 3}, content_type="application/json"
        ),
    ]
    for response in calls:
        assert response.status_code in (401, 403)
        assert response["Content-Type"] == PROBLEM
    assert Incident.objects.get(pk=pk).status == "open"
    assert SagaType.objects.get(name="order").max_attempts is None


def test_a_service_key_can_only_report(service_key, incidents) -> None:
    client = Client(HTTP_AUTHORIZATION=f"Bearer {service_key.secret}")
    for response in (
        client.get("/api/v1/incidents"),
        client.post(f"/api/v1/incidents/{incidents['order-1']}/acknowledge"),
        client.get("/api/v1/saga-types"),
    ):
        assert "only report" in assert_problem(response, 403)["detail"]


def test_the_openapi_schema_lists_the_endpoints(user_client) -> None:
    schema = user_client.get("/api/v1/schema?format=json").json()
    paths = schema["paths"]
    assert set(paths["/api/v1/incidents/{incident_id}/resolve"]) == {"post"}
    assert set(paths["/api/v1/saga-types/{name}"]) == {"get", "patch"}
    assert "/api/v1/incidents" in paths
    assert "/api/v1/saga-types" in paths
    resolve = schema["components"]["schemas"]["IncidentResolve"]
    assert resolve["required"] == ["note"]
    conflict = paths["/api/v1/incidents/{incident_id}/resolve"]["post"]["responses"]["409"]
    assert PROBLEM in conflict["content"]
