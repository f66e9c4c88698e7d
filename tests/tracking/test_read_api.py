"""GET /api/v1/sagas, /sagas/{id}, /sagas/{id}/events: filters, keyset pages, auth."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import Client

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def saga_events(
    saga_id: str,
    minute: float,
    *,
    status: str = "completed",
    saga_type: str = "order",
    attrs: dict[str, Any] | None = None,
    service: str | None = None,
) -> list[dict[str, Any]]:
    base = {"saga_id": saga_id}
    if service:
        base["service"] = service
    events = [
        {
            **base,
            "id": f"{saga_id}-0",
            "type": "saga.started",
            "saga_type": saga_type,
            "occurred_at": at(minute),
            "attributes": attrs or {},
        },
        {
            **base,
            "id": f"{saga_id}-1",
            "type": "step.started",
            "step": "charge",
            "occurred_at": at(minute + 0.1),
        },
    ]
    if status == "completed":
        events += [
            {
                **base,
                "id": f"{saga_id}-2",
                "type": "step.succeeded",
                "step": "charge",
                "occurred_at": at(minute + 0.2),
            },
            {
                **base,
                "id": f"{saga_id}-3",
                "type": "saga.completed",
                "occurred_at": at(minute + 0.3),
            },
        ]
    elif status == "compensation_failed":
        events += [
            {
                **base,
                "id": f"{saga_id}-2",
                "type": "step.failed",
                "step": "charge",
                "occurred_at": at(minute + 0.2),
            },
            {
                **base,
                "id": f"{saga_id}-3",
                "type": "saga.compensation_failed",
                "occurred_at": at(minute + 0.3),
            },
        ]
    return events


@pytest.fixture
def sagas(api) -> None:
    events = []
    events += saga_events("order-1", 0, attrs={"order_id": 1, "customer": "ada"})
    events += saga_events("order-2", 1, status="running", attrs={"order_id": 2})
    events += saga_events("order-3", 2, status="compensation_failed", attrs={"customer": "ada"})
    events += saga_events("refund-1", 3, saga_type="refund")
    assert api.batch(events).json()["rejected"] == 0


def ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.content
    return [s["saga_id"] for s in response.json()["results"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["refund-1", "order-3", "order-2", "order-1"]),
        ("sort=started_at", ["order-1", "order-2", "order-3", "refund-1"]),
        ("sort=-last_event_at", ["refund-1", "order-3", "order-2", "order-1"]),
        ("type=refund", ["refund-1"]),
        ("status=running", ["order-2"]),
        ("status=completed,compensation_failed", ["refund-1", "order-3", "order-1"]),
        ("service=payment", ["refund-1", "order-3", "order-2", "order-1"]),
        ("service=nobody", []),
        ("step=charge", ["refund-1", "order-3", "order-2", "order-1"]),
        ("step=ship", []),
        ("saga_id=order-", ["order-3", "order-2", "order-1"]),
        ("attr.customer=ada", ["order-3", "order-1"]),
        ("attr.order_id=2", ["order-2"]),
        ("attr.order_id=2&attr.customer=ada", []),
        (f"started_after={at(1)}".replace("+", "%2B"), ["refund-1", "order-3", "order-2"]),
        (f"started_before={at(1)}".replace("+", "%2B"), ["order-1"]),
    ],
)
def test_filters(user_client, sagas, query, expected) -> None:
    assert ids(user_client.get(f"/api/v1/sagas?{query}")) == expected


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=exploded", "status"),
        ("flag=zzz", "flag"),  # was an empty list, as if no saga had it
        ("sort=name", "sort"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("cursor=garbage", "cursor"),
        ("started_after=yesterday", "started_after"),
        ("started_after=9999-12-31T23:59:59-23:59", "started_after"),  # past datetime's range
        ("started_before=0001-01-01T00:00:00%2B01:00", "started_before"),
        ("attr.a%20b=1", "attr.a b"),
    ],
)
def test_bad_parameters_are_problem_json_naming_the_parameter(
    user_client, sagas, query, field
) -> None:
    response = user_client.get(f"/api/v1/sagas?{query}")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == [field]


def test_keyset_pages_are_stable_under_inserts(api, user_client, sagas) -> None:
    # given the first page of two
    first = user_client.get("/api/v1/sagas?limit=2").json()
    assert [s["saga_id"] for s in first["results"]] == ["refund-1", "order-3"]
    # when a newer saga arrives before the next page is read
    api.batch(saga_events("order-9", 30))
    second = user_client.get(f"/api/v1/sagas?limit=2&cursor={first['next_cursor']}").json()
    # then the next page continues where the first stopped: nothing repeated or skipped
    assert [s["saga_id"] for s in second["results"]] == ["order-2", "order-1"]
    assert second["next_cursor"] is None


def test_a_saga_with_its_steps_and_attempts(user_client, sagas) -> None:
    body = user_client.get("/api/v1/sagas/order-3").json()
    assert body["status"] == "compensation_failed"
    assert body["saga_type"] == "order"
    assert body["steps"][0]["name"] == "charge"
    assert body["steps"][0]["attempts"][0]["outcome"] == "failed"
    assert body["version"] >= 1
    assert body["services"] == ["payment"]


def test_a_sagas_events_in_order_with_both_clocks(user_client, sagas) -> None:
    events = user_client.get("/api/v1/sagas/order-1/events").json()["results"]
    assert [e["type"] for e in events] == [
        "saga.started",
        "step.started",
        "step.succeeded",
        "saga.completed",
    ]
    assert all(e["received_at"] and e["occurred_at"] for e in events)
    assert isinstance(events[0]["skew_ms"], int)


def test_an_unknown_saga_is_404_problem(user_client, db) -> None:
    for url in ("/api/v1/sagas/nope", "/api/v1/sagas/nope/events"):
        response = user_client.get(url)
        assert response.status_code == 404
        assert response["Content-Type"] == "application/problem+json"


def test_saga_ids_with_slashes_work(api, user_client) -> None:
    api.batch(saga_events("tenant/a/order-1", 0))
    assert user_client.get("/api/v1/sagas/tenant/a/order-1").json()["saga_id"] == "tenant/a/order-1"
    assert len(user_client.get("/api/v1/sagas/tenant/a/order-1/events").json()["results"]) == 4


def test_anonymous_readers_are_refused(db) -> None:
    response = Client().get("/api/v1/sagas")
    assert response.status_code in (401, 403)
    assert response["Content-Type"] == "application/problem+json"


def test_a_service_key_can_only_report(service_key, sagas) -> None:
    response = Client().get("/api/v1/sagas", HTTP_AUTHORIZATION=f"Bearer {service_key.secret}")
    assert response.status_code == 403
    assert "only report" in response.json()["detail"]


def test_the_openapi_schema_lists_the_endpoints(user_client) -> None:
    response = user_client.get("/api/v1/schema?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/api/v1/sagas" in paths
    assert user_client.get("/api/v1/docs").status_code == 200


def test_a_person_without_a_role_reads_nothing(role_client) -> None:
    response = role_client(None).get("/api/v1/sagas")
    assert response.status_code == 403
    assert response["Content-Type"].startswith("application/problem+json")
    assert "with a role" in response.json()["detail"]


def test_the_schema_documents_ingest_from_its_validator_and_is_valid_openapi(user_client) -> None:
    from drf_spectacular.validation import validate_schema

    from tracking.protocol import EventV1

    schema = user_client.get("/api/v1/schema?format=json").json()
    validate_schema(schema)  # raises on an invalid OpenAPI 3.0 document
    post = schema["paths"]["/api/v1/events"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/EventV1"} in body["oneOf"]
    event = schema["components"]["schemas"]["EventV1"]
    assert set(event["properties"]) == set(EventV1.__struct_fields__)
    assert {"id", "saga_id", "type", "occurred_at"} <= set(event["required"])
    assert {"200", "400", "401", "413", "415", "422", "503"} <= set(post["responses"])
    for path in ("/api/v1/otlp/v1/traces", "/v1/traces"):
        assert "post" in schema["paths"][path]
    # what the events and detail endpoints really answer
    events = schema["paths"]["/api/v1/sagas/{saga_id}/events"]["get"]["responses"]
    ref = events["200"]["content"]["application/json"]["schema"]["$ref"]
    assert "results" in schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert "404" in events
    assert "404" in schema["paths"]["/api/v1/sagas/{saga_id}"]["get"]["responses"]
    assert "400" in schema["paths"]["/api/v1/sagas"]["get"]["responses"]


def test_the_ingest_schema_states_the_configured_limits(user_client, settings) -> None:
    settings.SAGAADMIN = {
        **settings.SAGAADMIN,
        "INGEST_MAX_EVENTS": 250,
        "INGEST_MAX_BODY_BYTES": 2048,
        "OTLP_MAX_BYTES": 4096,
        "OTLP_MAX_SPANS": 30,
    }
    paths = user_client.get("/api/v1/schema?format=json").json()["paths"]
    post = paths["/api/v1/events"]["post"]
    batch = post["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]
    assert batch["properties"]["events"]["maxItems"] == 250
    assert (
        post["responses"]["413"]["description"] == "more than 2,048 bytes, or more than 250 events"
    )
    otlp = paths["/v1/traces"]["post"]["responses"]["413"]["description"]
    assert otlp.startswith("more than 2,048 bytes as sent, more than 4,096 decompressed")
    assert "more than 30 spans" in otlp


def test_an_unknown_saga_is_a_not_found_problem(user_client) -> None:
    for url in ("/api/v1/sagas/nope", "/api/v1/sagas/nope/events"):
        response = user_client.get(url)
        assert response.status_code == 404
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["type"].endswith("/not-found")


def test_sentinel_times_filter_and_a_nul_is_named(user_client, sagas) -> None:
    for query in (
        "started_before=9999-12-31T23:59:59Z",
        "started_after=0001-01-01T00:00:00Z",
        "started_after=2026-01-01T00:00:00%2B16:00",  # PostgreSQL takes offsets to ±15:59
    ):
        assert len(ids(user_client.get(f"/api/v1/sagas?{query}"))) == 4, query
    response = user_client.get("/api/v1/sagas?saga_id=ord%00")
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == ["saga_id"]


def test_a_saga_id_holding_slash_actions_is_still_read(api, user_client) -> None:
    assert api.batch(saga_events("tenant-7/actions/2024-001", 0)).json()["rejected"] == 0
    response = user_client.get("/api/v1/sagas/tenant-7/actions/2024-001")
    assert response.status_code == 200
    assert response.json()["saga_id"] == "tenant-7/actions/2024-001"
    assert user_client.get("/api/v1/sagas/tenant-7/actions/2024-002").status_code == 404
