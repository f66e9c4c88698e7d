"""/api/v1/orchestrator/*: definitions, starting a saga (admins), a run's state, circuits.

The saga types are the orchestrator tests' (tests/orchestrator/sagas.py: importing it
defines them); a real worker runs them (``Worker().drain()``), remote steps get their
answers through ``step_reply`` as the reply consumer would give them.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from orchestrator.engine import step_reply
from orchestrator.models import Circuit, SagaRun, StepRun
from orchestrator.worker import Worker
from tests.orchestrator import sagas
from tracking.models import Saga, TelemetryEvent

PROBLEM = "application/problem+json"
DOWN = {"type": "ServiceUnavailable", "message": "503 from payment", "retryable": True}


@pytest.fixture(autouse=True)
def _script(test_sagas: object) -> None:
    """Every action succeeds unless a test scripts its outcomes."""


@pytest.fixture
def viewer(role_client) -> Client:
    return role_client("viewer")


@pytest.fixture
def admin(role_client) -> Client:
    return role_client("admin")


def start(client: Client, **body: Any) -> Any:
    return client.post("/api/v1/orchestrator/sagas", body, content_type="application/json")


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    if field is not None:
        assert [e["field"] for e in body["errors"]] == [field], body
    return body


def run_of(client: Client, saga_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/orchestrator/sagas/{saga_id}")
    assert response.status_code == 200, response.content
    body: dict[str, Any] = response.json()
    return body


def steps_of(body: dict[str, Any], *fields: str) -> list[tuple[Any, ...]]:
    return [tuple(s[f] for f in ("name", *fields)) for s in body["steps"]]


# -- definitions -----------------------------------------------------------------------


def test_the_definitions_list_every_defined_type_with_its_steps(viewer) -> None:
    response = viewer.get("/api/v1/orchestrator/definitions")
    assert response.status_code == 200
    results = response.json()["results"]
    names = [d["name"] for d in results]
    assert names == sorted(names)
    assert {"test-order", "test-remote", "test-tcc"} <= set(names)
    remote = next(d for d in results if d["name"] == "test-remote")
    assert remote["service"] == "order"
    fast = {"max_attempts": 3, "backoff_base": 0.0, "backoff_max": 0.0, "jitter": 0.0}
    assert remote["steps"] == [
        {
            "name": "reserve_stock",
            "kind": "local",
            "service": "",
            "command": "",
            "undo_command": "",
            "retry": fast,
            "compensation_retry": fast,
            "timeout": 30.0,
            "has_compensation": True,
            "has_confirm": False,
        },
        {
            "name": "charge_payment",
            "kind": "remote",
            "service": "payment",
            "command": "charge",
            "undo_command": "undo_charge",
            "retry": fast,
            "compensation_retry": fast,
            "timeout": 30.0,
            "has_compensation": True,
            "has_confirm": False,
        },
        {
            "name": "create_shipment",
            "kind": "local",
            "service": "",
            "command": "",
            "undo_command": "",
            "retry": fast,
            "compensation_retry": fast,
            "timeout": 30.0,
            "has_compensation": True,
            "has_confirm": False,
        },
    ]
    tcc = next(d for d in results if d["name"] == "test-tcc")
    assert [(s["name"], s["kind"], s["has_confirm"]) for s in tcc["steps"]] == [
        ("hold_seat", "tcc", True),
        ("charge_card", "local", False),
    ]
    slow = next(d for d in results if d["name"] == "test-slow-retry")
    assert slow["steps"][0]["retry"] == {
        "max_attempts": 3,
        "backoff_base": 60.0,
        "backoff_max": 60.0,
        "jitter": 0.0,
    }


# -- starting a saga ---------------------------------------------------------------------


def test_an_admin_starts_a_saga_and_a_second_start_returns_the_same_run(admin) -> None:
    # when an admin starts a saga
    response = start(admin, saga_type="test-order", saga_id="order-1", data={"order_id": 1})
    # then it is created, waiting for a worker, and reported as a saga
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["saga_id"], body["saga_type"], body["status"]) == (
        "order-1",
        "test-order",
        "running",
    )
    assert (body["paused"], body["epoch"], body["version"]) == (False, 1, 1)
    assert body["data"] == {"order_id": 1}
    assert body["results"] == {}
    assert steps_of(body, "kind", "status", "attempt") == [
        ("create_order", "local", "pending", 0),
        ("charge_payment", "local", "pending", 0),
        ("reserve_stock", "local", "pending", 0),
        ("create_shipment", "local", "pending", 0),
    ]
    assert body["saga_url"] == "http://testserver/api/v1/sagas/order-1"
    run = SagaRun.objects.get(saga_id="order-1")
    assert run.next_run_at is not None and run.next_run_at <= timezone.now()
    saga = Saga.objects.get(saga_id="order-1")
    assert (saga.saga_type, saga.status, saga.attributes) == (
        "test-order",
        "running",
        {"order_id": 1},
    )
    # when the same start comes again (a retried request)
    again = start(admin, saga_type="test-order", saga_id="order-1", data={"order_id": 2})
    # then it answers 200 with the run that exists, and nothing new was started
    assert again.status_code == 200, again.content
    assert again.json()["data"] == {"order_id": 1}
    assert SagaRun.objects.filter(saga_id="order-1").count() == 1
    assert TelemetryEvent.objects.filter(saga_id="order-1", type="saga.started").count() == 1


def test_a_started_saga_runs_to_the_end_and_its_run_state_shows_it(admin, viewer) -> None:
    assert start(admin, saga_type="test-order", saga_id="orders/2", data={}).status_code == 201
    # when a worker drains
    assert Worker(owner="w-1").drain() > 0
    # then every step succeeded once, and the run is finished and released
    body = run_of(viewer, "orders/2")
    assert body["status"] == "completed"
    assert (body["next_run_at"], body["lease_owner"], body["lease_until"]) == (None, "", None)
    assert body["waiting"] == ""
    assert body["version"] > 1
    assert body["ended_at"] is not None
    assert steps_of(body, "status", "attempt", "compensation_attempt") == [
        (name, "succeeded", 1, 0) for name in sagas.ORDER_STEPS
    ]
    assert body["results"]["create_order"] == {"done": "create_order", "attempt": 1}
    assert Saga.objects.get(saga_id="orders/2").status == "completed"


def test_a_failed_step_shows_its_error_and_the_compensation(admin, viewer) -> None:
    # given a saga whose charge fails for good
    sagas.SCRIPT["forward:charge_payment"] = ["fatal"]
    start(admin, saga_type="test-order", saga_id="order-3")
    # when a worker drains
    Worker().drain()
    # then the completed step was undone and the run says why
    body = run_of(viewer, "order-3")
    assert body["status"] == "compensated"
    assert steps_of(body, "status", "attempt", "compensation_attempt") == [
        ("create_order", "compensated", 1, 1),
        ("charge_payment", "failed", 1, 0),
        ("reserve_stock", "pending", 0, 0),
        ("create_shipment", "pending", 0, 0),
    ]
    error = {"type": "Refused", "message": "charge_payment: refused", "retryable": False}
    assert body["steps"][1]["last_error"] == error
    assert body["last_error"] == {**error, "step": "charge_payment"}


def test_a_retry_waiting_for_its_backoff_shows_why_and_when(admin, viewer) -> None:
    sagas.SCRIPT["forward:create_order"] = ["fail"]
    start(admin, saga_type="test-slow-retry", saga_id="slow-1")
    before = timezone.now()
    Worker().drain()
    body = run_of(viewer, "slow-1")
    assert body["status"] == "running"
    assert body["waiting"].startswith("retry 2 of create_order at ")
    next_run = datetime.fromisoformat(body["next_run_at"])
    assert before + timedelta(seconds=59) < next_run <= timezone.now() + timedelta(seconds=60)
    assert body["steps"][0]["status"] == "failed"
    assert body["steps"][0]["last_error"]["type"] == "ConnectionError"


def test_a_remote_step_shows_the_command_it_waits_for(admin, viewer) -> None:
    start(admin, saga_type="test-remote", saga_id="remote-1")
    Worker().drain()
    body = run_of(viewer, "remote-1")
    command_id = StepRun.objects.get(run__saga_id="remote-1", name="charge_payment").command_id
    assert len(command_id) == 32
    assert steps_of(body, "kind", "status", "service", "command", "command_id") == [
        ("reserve_stock", "local", "succeeded", "", "", ""),
        ("charge_payment", "remote", "running", "payment", "charge", command_id),
        ("create_shipment", "local", "pending", "", "", ""),
    ]
    assert body["waiting"] == "waiting for payment to answer charge"
    assert body["steps"][1]["deadline"] is not None


def test_a_tcc_step_shows_its_transaction_state(admin, viewer) -> None:
    start(admin, saga_type="test-tcc", saga_id="tcc-1")
    Worker().drain()
    body = run_of(viewer, "tcc-1")
    assert body["status"] == "completed"
    assert steps_of(body, "kind", "tx_state") == [
        ("hold_seat", "tcc", "committed"),
        ("charge_card", "local", ""),
    ]


def test_data_and_results_are_redacted_like_payloads(admin, viewer) -> None:
    data = {"order_id": 7, "card_number": "4111111111111111", "customer": {"Password": "x"}}
    response = start(admin, saga_type="test-order", saga_id="order-7", data=data)
    expected = {"order_id": 7, "card_number": "[redacted]", "customer": {"Password": "[redacted]"}}
    assert response.json()["data"] == expected
    assert run_of(viewer, "order-7")["data"] == expected
    # the orchestrator keeps the real data for the steps
    assert SagaRun.objects.get(saga_id="order-7").data == data


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"saga_type": "nope", "saga_id": "x-1"}, "saga_type", "no saga type 'nope' is defined"),
        ({"saga_id": "x-1"}, "saga_type", "This field is required."),
        ({"saga_type": "test-order"}, "saga_id", "This field is required."),
        ({"saga_type": "test-order", "saga_id": ""}, "saga_id", "This field may not be blank."),
        ({"saga_type": "test-order", "saga_id": "x" * 201}, "saga_id", "1 to 200 characters"),
        ({"saga_type": "test-order", "saga_id": "x-1", "data": [1]}, "data", "a JSON object"),
        ({"saga_type": "test-order", "saga_id": "x-1", "data": "{}"}, "data", "a JSON object"),
    ],
)
def test_a_bad_start_is_refused_naming_the_field(admin, body, field, message) -> None:
    response = start(admin, **body)
    problem = assert_problem(response, 400, field)
    assert problem["errors"][0]["message"] == message
    assert not SagaRun.objects.exists()
    assert not Saga.objects.exists()


def test_a_saga_id_of_another_type_or_reported_by_services_is_refused(admin, api) -> None:
    # given an orchestrated saga, and a saga a service reports
    assert start(admin, saga_type="test-order", saga_id="order-8").status_code == 201
    event = {"id": "e-1", "saga_id": "ext-1", "type": "saga.started", "saga_type": "order"}
    assert api.batch([event | {"occurred_at": timezone.now().isoformat()}]).json()["accepted"] == 1
    # when an admin starts a saga of another type with the first id
    problem = assert_problem(start(admin, saga_type="test-tcc", saga_id="order-8"), 400, "saga_id")
    # then it is refused, and the run stays what it was
    assert problem["errors"][0]["message"] == "already used by a saga of type test-order"
    assert SagaRun.objects.get(saga_id="order-8").saga_type == "test-order"
    # and the reported saga's id cannot become an orchestrated saga's
    problem = assert_problem(start(admin, saga_type="test-order", saga_id="ext-1"), 400, "saga_id")
    assert "services report" in problem["errors"][0]["message"]
    assert not SagaRun.objects.filter(saga_id="ext-1").exists()
    # an unknown type is named first
    assert_problem(start(admin, saga_type="nope", saga_id="ext-1"), 400, "saga_type")


def test_a_body_that_is_not_json_is_refused(admin) -> None:
    response = admin.post(
        "/api/v1/orchestrator/sagas", "saga_type=test-order&saga_id=f-1", content_type="text/plain"
    )
    assert_problem(response, 415)
    response = admin.post(
        "/api/v1/orchestrator/sagas", "{not json", content_type="application/json"
    )
    assert_problem(response, 400)
    assert not SagaRun.objects.exists()


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_only_admins_start_sagas(role_client, role) -> None:
    response = start(role_client(role), saga_type="test-order", saga_id="order-9")
    assert assert_problem(response, 403)["detail"] == "Only admins can start sagas."
    assert not SagaRun.objects.exists()


def test_strangers_and_service_keys_get_nothing(role_client, service_key, admin) -> None:
    start(admin, saga_type="test-order", saga_id="order-10")
    urls = [
        "/api/v1/orchestrator/definitions",
        "/api/v1/orchestrator/sagas/order-10",
        "/api/v1/orchestrator/circuits",
    ]
    key = Client(HTTP_AUTHORIZATION=f"Bearer {service_key.secret}")
    for client in (Client(), role_client(None), key):
        for url in urls:
            assert client.get(url).status_code in (401, 403)
        response = start(client, saga_type="test-order", saga_id="order-11")
        assert response.status_code in (401, 403)
        assert response["Content-Type"] == PROBLEM
    assert "only report" in assert_problem(key.get(urls[0]), 403)["detail"]
    assert list(SagaRun.objects.values_list("saga_id", flat=True)) == ["order-10"]


def test_a_saga_that_is_not_orchestrated_has_no_run(viewer, api) -> None:
    event = {"id": "e-1", "saga_id": "ext-2", "type": "saga.started", "saga_type": "order"}
    api.batch([event | {"occurred_at": timezone.now().isoformat()}])
    response = viewer.get("/api/v1/orchestrator/sagas/ext-2")
    assert "ext-2" in assert_problem(response, 404)["detail"]
    assert viewer.get("/api/v1/sagas/ext-2").status_code == 200


# -- circuits ----------------------------------------------------------------------------


@pytest.fixture
def breaker(settings: Any) -> None:
    settings.ORCHESTRATOR = {
        **settings.ORCHESTRATOR,
        "CIRCUIT_FAILURES": 2,
        "CIRCUIT_OPEN_SECONDS": 60,
    }


def test_the_circuits_show_an_open_breaker_and_the_run_waiting_for_it(
    breaker, admin, viewer
) -> None:
    assert viewer.get("/api/v1/orchestrator/circuits").json() == {"results": []}
    # given a remote step whose service answers with errors twice
    start(admin, saga_type="test-breaker", saga_id="cb-1")
    for _ in range(2):
        Worker().drain()
        command_id = StepRun.objects.get(run__saga_id="cb-1").command_id
        assert step_reply(command_id=command_id, ok=False, error=DOWN)
    # when the worker comes to it again
    Worker().drain()
    # then the payment circuit is open, and the run waits for it without an attempt
    circuit = Circuit.objects.get(service="payment")
    body = viewer.get("/api/v1/orchestrator/circuits").json()
    assert body == {
        "results": [
            {
                "service": "payment",
                "state": "open",
                "failures": 2,
                "opened_at": body["results"][0]["opened_at"],
                "retry_at": body["results"][0]["retry_at"],
            }
        ]
    }
    opened = datetime.fromisoformat(body["results"][0]["opened_at"])
    assert opened == circuit.opened_at
    assert datetime.fromisoformat(body["results"][0]["retry_at"]) == opened + timedelta(seconds=60)
    run = run_of(viewer, "cb-1")
    assert run["waiting"].startswith("waiting: circuit open for payment until")
    assert datetime.fromisoformat(run["next_run_at"]) == circuit.retry_at
    assert steps_of(run, "status", "attempt") == [("charge_payment", "failed", 2)]


def test_circuits_are_listed_by_service_with_their_state(breaker, viewer) -> None:
    now = timezone.now()
    Circuit.objects.create(service="shipping", state="half_open", failures=3, opened_at=now)
    Circuit.objects.create(service="billing", failures=1)
    body = viewer.get("/api/v1/orchestrator/circuits").json()
    assert [(c["service"], c["state"], c["failures"], c["retry_at"]) for c in body["results"]] == [
        ("billing", "closed", 1, None),
        ("shipping", "half_open", 3, None),
    ]


def test_the_openapi_schema_lists_the_orchestrator_endpoints(viewer) -> None:
    schema = viewer.get("/api/v1/schema?format=json").json()
    paths = schema["paths"]
    assert set(paths["/api/v1/orchestrator/sagas"]) == {"post"}
    assert set(paths["/api/v1/orchestrator/sagas/{saga_id}"]) == {"get"}
    assert set(paths["/api/v1/orchestrator/definitions"]) == {"get"}
    assert set(paths["/api/v1/orchestrator/circuits"]) == {"get"}
    assert set(schema["components"]["schemas"]["SagaStart"]["required"]) == {"saga_type", "saga_id"}
    responses = paths["/api/v1/orchestrator/sagas"]["post"]["responses"]
    assert {"200", "201", "400", "403"} <= set(responses)
