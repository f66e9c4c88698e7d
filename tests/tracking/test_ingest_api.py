"""POST /api/v1/events: the protocol, per-event results and whole-request errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from tests.conftest import database_away
from tracking.models import Saga, TelemetryEvent
from tracking.protocol import EVENT_TYPES

PROBLEM = "application/problem+json"


def _field_errors(response: Any, index: int = 0) -> list[str]:
    return [e["field"] for e in response.json()["results"][index].get("errors", [])]


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_protocol_event_type_is_accepted_and_stored(api, make_event, event_type) -> None:
    # given one valid event of each type
    event = make_event(event_type, saga_id=f"saga-{event_type}", step="charge")
    # when it is reported
    response = api.batch([event])
    # then it is accepted and stored with both clocks
    assert response.status_code == 200, response.content
    assert response.json()["results"] == [{"index": 0, "id": event["id"], "status": "accepted"}]
    stored = TelemetryEvent.objects.get(event_id=event["id"])
    assert stored.type == event_type
    assert stored.service.name == "payment"
    assert stored.received_at is not None
    assert Saga.objects.get(saga_id=f"saga-{event_type}").event_count == 1


def test_a_single_event_body_is_accepted(api, make_event) -> None:
    response = api.post(make_event("saga.started"))
    assert response.status_code == 200
    assert response.json()["accepted"] == 1


def test_all_optional_fields_round_trip(api, make_event, user_client) -> None:
    event = make_event(
        "step.failed",
        version=1,
        attempt=2,
        sequence=7,
        service="payment",
        deadline="2026-11-26T11:00:00+01:00",
        idempotency_key="charge-saga-1-2",
        error={"type": "CardDeclined", "message": "insufficient funds", "retryable": False},
        attributes={"order_id": 42, "customer_id": "c-9", "vip": True, "score": 1.5, "none": None},
        payload={"amount": {"value": 1999, "currency": "EUR"}},
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00f067aa0ba902b7",
    )
    assert api.batch([event]).json()["accepted"] == 1
    stored = user_client.get("/api/v1/sagas/saga-1/events").json()["results"][0]
    for field in (
        "attempt",
        "sequence",
        "idempotency_key",
        "error",
        "attributes",
        "payload",
        "trace_id",
        "span_id",
        "type",
        "step",
        "service",
    ):
        assert stored[field] == event[field], field
    assert stored["deadline"] == "2026-11-26T10:00:00Z"


def test_resending_the_same_event_is_a_duplicate_and_changes_nothing(api, make_event) -> None:
    event = make_event("saga.started")
    api.batch([event])
    version = Saga.objects.get(saga_id="saga-1").version
    # when the reporter retries
    response = api.batch([event, event])
    # then
    assert [r["status"] for r in response.json()["results"]] == ["duplicate", "duplicate"]
    assert TelemetryEvent.objects.count() == 1
    assert Saga.objects.get(saga_id="saga-1").version == version


def test_same_id_with_other_content_is_a_conflict_and_the_original_is_kept(api, make_event) -> None:
    event = make_event("step.started", attempt=1)
    api.batch([event])
    response = api.batch([{**event, "attempt": 2}])
    result = response.json()["results"][0]
    assert result["status"] == "rejected"
    assert result["errors"][0]["field"] == "id"
    assert "different content" in result["errors"][0]["message"]
    assert TelemetryEvent.objects.get(event_id=event["id"]).attempt == 1


def test_a_conflict_inside_one_batch_keeps_the_first(api, make_event) -> None:
    event = make_event("step.started", attempt=1)
    response = api.batch([event, {**event, "attempt": 3}])
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "rejected"]
    assert TelemetryEvent.objects.get(event_id=event["id"]).attempt == 1


def test_a_large_batch_with_some_stored_events_stores_the_rest_and_names_the_others(
    api, make_event
) -> None:
    # given a batch past the bulk-write threshold (tracking.bulk.COPY_MIN_ROWS: on
    # PostgreSQL it goes by COPY first), three of whose events were stored before
    events = [make_event("step.started", saga_id=f"saga-{i}", step="charge") for i in range(100)]
    api.batch([events[10], events[50], events[90]])
    events[50] = {**events[50], "attempt": 7}  # same id, other content
    # when the whole batch is reported
    results = api.batch(events).json()["results"]
    # then the stored ones are a duplicate and a conflict, every other event is stored
    statuses = [r["status"] for r in results]
    assert statuses[10] == statuses[90] == "duplicate"
    assert statuses[50] == "rejected"
    assert results[50]["errors"][0]["field"] == "id"
    assert statuses.count("accepted") == 97
    assert TelemetryEvent.objects.count() == 100
    assert TelemetryEvent.objects.get(event_id=events[50]["id"]).attempt == 1
    assert Saga.objects.filter(event_count=1).count() == 100


def test_a_duplicate_id_from_another_service_is_a_different_event(
    api, other_key, make_event
) -> None:
    event = make_event("step.started")
    api.batch([event])
    response = Client().post(
        "/api/v1/events",
        data=json.dumps(event),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {other_key.secret}",
    )
    assert response.json()["accepted"] == 1
    assert TelemetryEvent.objects.filter(event_id=event["id"]).count() == 2


BAD_EVENTS: list[tuple[str, dict[str, Any], str]] = [
    ("missing id", {"id": None}, "id"),
    ("missing saga_id", {"saga_id": None}, "saga_id"),
    ("missing occurred_at", {"occurred_at": None}, "occurred_at"),
    ("id is a number", {"id": 7}, "id"),
    ("attempt is text", {"attempt": "2"}, "attempt"),
    ("attempt is zero", {"attempt": 0}, "attempt"),
    ("negative sequence", {"sequence": -1}, "sequence"),
    ("id too long", {"id": "x" * 129}, "id"),
    ("saga_id too long", {"saga_id": "s" * 201}, "saga_id"),
    ("step too long", {"step": "s" * 101}, "step"),
    ("idempotency key too long", {"idempotency_key": "k" * 201}, "idempotency_key"),
    ("naive time", {"occurred_at": "2026-11-26T10:00:00"}, "occurred_at"),
    ("not a time", {"occurred_at": "yesterday"}, "occurred_at"),
    ("month 13", {"occurred_at": "2026-13-01T00:00:00Z"}, "occurred_at"),
    ("naive deadline", {"deadline": "2026-11-26T10:00:00"}, "deadline"),
    ("unknown type", {"type": "step.exploded"}, "type"),
    ("unknown field", {"occured_at": "2026-11-26T10:00:00Z"}, "occured_at"),
    ("not an object", None, "event"),
    ("future version", {"version": 9}, "version"),
    ("step missing on step event", {"step": ""}, "step"),
    ("attributes not scalar", {"attributes": {"a": {"b": 1}}}, "attributes"),
    ("payload not an object", {"payload": [1, 2]}, "payload"),
    ("error wrong type", {"error": {"retryable": "yes"}}, "error.retryable"),
    ("bad trace id", {"trace_id": "XYZ"}, "trace_id"),
    ("service of another team", {"service": "inventory"}, "service"),
]


@pytest.mark.parametrize(("case", "override", "field"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_a_bad_event_is_rejected_naming_the_field_and_the_good_ones_stored(
    api, make_event, case, override, field
) -> None:
    good_before, good_after = make_event("saga.started"), make_event("step.started")
    bad: Any = 42
    if override is not None:
        bad = {k: v for k, v in {**make_event("step.started"), **override}.items() if v is not None}
    response = api.batch([good_before, bad, good_after])
    assert response.status_code == 200
    body = response.json()
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "accepted"]
    assert _field_errors(response, 1) == [field], body["results"][1]
    assert body["results"][1]["errors"][0]["message"]
    assert set(TelemetryEvent.objects.values_list("event_id", flat=True)) == {
        good_before["id"],
        good_after["id"],
    }


def test_a_nul_in_one_event_rejects_that_event_only(api, make_event) -> None:
    # the Django view (no ASGI fast path) answers as the fast path does
    good, bad = make_event("saga.started"), {**make_event("step.started"), "payload": {}}
    bad["payload"] = {"note": "x\u0000y"}
    response = api.batch([good, bad])
    assert response.status_code == 200
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "rejected"]
    assert _field_errors(response, 1) == ["payload.note"]
    assert list(TelemetryEvent.objects.values_list("event_id", flat=True)) == [good["id"]]


def test_the_unsupported_version_error_names_the_supported_ones(api, make_event) -> None:
    response = api.post(make_event(version=3))
    assert response.status_code == 422
    assert response["Content-Type"] == PROBLEM
    assert "supported: 1" in response.json()["detail"]


def test_saga_type_is_required_on_saga_started(api, make_event) -> None:
    response = api.post(make_event("saga.started", saga_type=None))
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "saga_type", "message": "is required on saga.started"}
    ]


def test_message_events_need_the_message(api, make_event) -> None:
    response = api.post(make_event("message.published", message=None))
    assert response.json()["errors"][0]["field"] == "message"


def test_deeply_nested_payload_is_rejected_alone(api, make_event) -> None:
    good = make_event("saga.started")
    deep = "[" * 5000 + "]" * 5000
    head = '{"id":"deep","saga_id":"saga-1","type":"heartbeat",'
    bad_raw = head + '"occurred_at":"2026-11-26T10:00:00Z","payload":{"x":' + deep + "}}"
    shallow_but_too_deep = make_event("heartbeat", payload={"a": {"b": {"c": {}}}})
    parts = [json.dumps(good), bad_raw, json.dumps(shallow_but_too_deep)]
    raw = '{"events":[' + ",".join(parts) + "]}"
    from django.conf import settings
    from django.test import override_settings

    with override_settings(SAGAADMIN={**settings.SAGAADMIN, "PAYLOAD_MAX_DEPTH": 3}):
        response = api.post(None, raw=raw.encode())
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == ["accepted", "rejected", "rejected"]
    assert _field_errors(response, 1) == ["payload"]
    assert _field_errors(response, 2) == ["payload"]
    assert TelemetryEvent.objects.count() == 1


def test_payload_secrets_are_redacted_and_oversize_payloads_replaced(api, make_event) -> None:
    from django.conf import settings
    from django.test import override_settings

    with override_settings(SAGAADMIN={**settings.SAGAADMIN, "PAYLOAD_MAX_BYTES": 200}):
        response = api.batch(
            [
                make_event(
                    id="small", payload={"card": {"CVV": "123", "last4": "4242"}, "Password": "x"}
                ),
                make_event(id="big", payload={"blob": "x" * 500}),
            ]
        )
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "accepted"]
    assert "warnings" in response.json()["results"][1]
    assert TelemetryEvent.objects.get(event_id="small").payload == {
        "card": {"CVV": "[redacted]", "last4": "4242"},
        "Password": "[redacted]",
    }
    assert TelemetryEvent.objects.get(event_id="big").payload["_truncated"] is True


def test_markup_is_stored_as_data_and_returned_escaped(api, make_event, user_client) -> None:
    script = "<script>alert(1)</script>"
    event = make_event(
        "step.failed",
        saga_id=script,
        step=script,
        idempotency_key=script,
        error={"type": script, "message": script},
        attributes={"note": script},
        payload={"html": script},
    )
    assert api.batch([event]).json()["accepted"] == 1
    assert TelemetryEvent.objects.get().saga_id == script
    for url in ("/api/v1/sagas", f"/api/v1/sagas/{script}", f"/api/v1/sagas/{script}/events"):
        response = user_client.get(url)
        assert response.status_code == 200, url
        assert b"<script>" not in response.content
        assert script in response.content.decode("unicode_escape")
    assert user_client.get(f"/api/v1/sagas/{script}").json()["steps"][0]["name"] == script


# --- whole-request errors --------------------------------------------------------
def _assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"] and body["detail"]
    return body


def test_malformed_json_is_400(api) -> None:
    _assert_problem(api.post(None, raw=b'{"events": [ {"id": '), 400)


def test_a_json_array_body_is_400(api) -> None:
    assert "JSON object" in _assert_problem(api.post(None, raw=b"[]"), 400)["detail"]


def test_events_not_a_list_is_400(api) -> None:
    _assert_problem(api.post({"events": {"id": 1}}), 400)


def test_an_empty_batch_is_400(api) -> None:
    _assert_problem(api.post({"events": []}), 400)


def test_extra_top_level_fields_in_a_batch_are_400(api, make_event) -> None:
    _assert_problem(api.post({"events": [make_event()], "event": 1}), 400)


def test_no_key_is_401_with_a_challenge(make_event, db) -> None:
    response = Client().post("/api/v1/events", data=make_event(), content_type="application/json")
    _assert_problem(response, 401)
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_an_unknown_key_is_401(make_event, db) -> None:
    response = Client().post(
        "/api/v1/events",
        data=make_event(),
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer sa_000000000000_nope",
    )
    _assert_problem(response, 401)


def test_a_revoked_key_is_401(api, service_key, make_event) -> None:
    from tracking.keys import service_key_revoke

    service_key_revoke(prefix=service_key.key.prefix)
    _assert_problem(api.post(make_event()), 401)
    assert TelemetryEvent.objects.count() == 0


def test_wrong_content_type_is_415(service_key, db) -> None:
    response = Client().post(
        "/api/v1/events",
        data="id=1",
        content_type="text/plain",
        HTTP_AUTHORIZATION=f"Bearer {service_key.secret}",
    )
    _assert_problem(response, 415)


def test_get_is_405(api) -> None:
    response = api.client.get("/api/v1/events")
    _assert_problem(response, 405)
    assert response["Allow"] == "POST"


def test_a_body_over_one_mebibyte_is_413(api, make_event) -> None:
    events = [make_event(payload={"pad": "x" * 2000}) for _ in range(600)]
    body = _assert_problem(api.batch(events), 413)
    assert body["limit_bytes"] == 1024 * 1024
    assert TelemetryEvent.objects.count() == 0


def test_a_ten_thousand_event_batch_is_413_and_stores_nothing(api, make_event) -> None:
    from django.conf import settings
    from django.test import override_settings

    events = [
        {"id": str(i), "saga_id": "s", "type": "heartbeat", "occurred_at": "2026-01-01T00:00:00Z"}
        for i in range(10_000)
    ]
    # with a body limit large enough that the event count is what trips
    with override_settings(SAGAADMIN={**settings.SAGAADMIN, "INGEST_MAX_BODY_BYTES": 10 * 2**20}):
        body = _assert_problem(api.batch(events), 413)
    assert "10000 events" in body["detail"]
    assert TelemetryEvent.objects.count() == 0


def test_a_thousand_event_batch_is_accepted(api) -> None:
    events = [
        {
            "id": str(i),
            "saga_id": f"s{i % 50}",
            "type": "heartbeat",
            "occurred_at": "2026-01-01T00:00:00Z",
        }
        for i in range(1000)
    ]
    assert api.batch(events).json()["accepted"] == 1000
    assert Saga.objects.count() == 50


@pytest.mark.django_db(transaction=True)
def test_database_unreachable_is_503_with_retry_after(postgres, service_key, make_event) -> None:
    # given the database goes away after the key was checked once
    client = Client()
    ok = client.post(
        "/api/v1/events",
        data=make_event(),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {service_key.secret}",
    )
    assert ok.status_code == 200
    with database_away():
        response = client.post(
            "/api/v1/events",
            data=make_event(),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {service_key.secret}",
        )
    body = _assert_problem(response, 503)
    assert response["Retry-After"] == "5"
    assert "nothing was stored" in body["detail"]
    assert TelemetryEvent.objects.count() == 1


def test_the_same_instant_with_another_offset_is_a_duplicate(api, make_event) -> None:
    event = make_event("step.started", occurred_at="2026-11-26T10:00:00Z")
    api.batch([event])
    response = api.batch([{**event, "occurred_at": "2026-11-26T12:00:00+02:00"}])
    assert response.json()["results"][0]["status"] == "duplicate"


def test_an_overlong_attribute_key_is_named_as_attributes(api, make_event) -> None:
    response = api.batch([make_event(attributes={"k" * 101: 1})])
    assert [e["field"] for e in response.json()["results"][0]["errors"]] == ["attributes"]


def test_secrets_in_attributes_are_redacted_like_payloads(api, make_event) -> None:
    from tracking.models import Saga

    event = make_event("saga.started", attributes={"order_id": 7, "Password": "hunter2"})
    assert api.batch([event]).status_code == 200
    assert Saga.objects.get(saga_id="saga-1").attributes == {
        "order_id": 7,
        "Password": "[redacted]",
    }
