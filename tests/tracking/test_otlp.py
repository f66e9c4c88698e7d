"""The OTLP/HTTP receiver: the real exporter, both encodings, bad input, partial success."""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import pytest
from django.test import Client
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tracking.keys import CreatedKey, service_key_create
from tracking.models import Saga, Step, TelemetryEvent

PB = "application/x-protobuf"
TRACE = "5b8efff798038103d269b633813fc60c"


def _toy_saga(tracer: Any, saga_id: str) -> None:
    """An instrumented service: a saga span, three steps (one fails), a compensation,
    a published message, and a span with nothing to do with sagas."""
    saga = {"sagaadmin.saga.id": saga_id, "sagaadmin.saga.type": "order"}
    with tracer.start_as_current_span("GET /health"):
        pass
    with tracer.start_as_current_span(
        "order saga", attributes={**saga, "sagaadmin.saga.outcome": "compensated"}
    ):
        with tracer.start_as_current_span(
            "create order", attributes={**saga, "sagaadmin.step.name": "create_order"}
        ):
            time.sleep(0.01)
        with tracer.start_as_current_span(
            "orders publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.message.conversation_id": saga_id,
                "messaging.operation.type": "send",
                "messaging.destination.name": "order.created",
                "messaging.message.id": "m-1",
            },
        ):
            pass
        try:
            with tracer.start_as_current_span(
                "charge",
                attributes={**saga, "sagaadmin.step.name": "charge", "sagaadmin.step.attempt": 2},
            ):
                raise PermissionError("card declined")
        except PermissionError:
            pass  # the SDK recorded the exception event and set status ERROR
        with tracer.start_as_current_span(
            "undo create order",
            attributes={
                **saga,
                "sagaadmin.step.name": "create_order",
                "sagaadmin.step.phase": "compensation",
            },
        ):
            pass


@pytest.mark.django_db(transaction=True)
def test_the_real_exporter_turns_an_instrumented_saga_into_its_timeline(live_server: Any) -> None:
    key = service_key_create(service_name="orders").secret
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "orders"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    _toy_saga(provider.get_tracer("toy"), "otel-1")
    spans = memory.get_finished_spans()
    assert len(spans) == 6
    exporter = OTLPSpanExporter(
        endpoint=f"{live_server.url}/v1/traces", headers={"Authorization": f"Bearer {key}"}
    )
    assert exporter.export(spans).name == "SUCCESS"

    saga = Saga.objects.get(saga_id="otel-1")
    assert (saga.saga_type, saga.status) == ("order", "compensated")
    root = next(s for s in spans if s.name == "order saga")
    assert saga.trace_ids == [format(root.context.trace_id, "032x")]
    steps = {s.name: s for s in Step.objects.filter(saga=saga)}
    assert steps["charge"].status == "failed"
    assert steps["charge"].attempt == 2
    assert steps["charge"].last_error["type"] == "PermissionError"
    assert steps["charge"].last_error["message"] == "card declined"
    assert steps["create_order"].status == "compensated"
    types = sorted(TelemetryEvent.objects.filter(saga_id="otel-1").values_list("type", flat=True))
    assert types == sorted(
        [
            "saga.started",
            "saga.compensated",
            "step.started",
            "step.succeeded",
            "step.started",
            "step.failed",
            "compensation.started",
            "compensation.succeeded",
            "message.published",
        ]
    )
    assert TelemetryEvent.objects.count() == 9  # the health-check span was ignored

    # An exporter retrying the same batch reports duplicates: nothing new.
    assert exporter.export(spans).name == "SUCCESS"
    assert TelemetryEvent.objects.count() == 9
    exporter.shutdown()


def _request_json(saga_id: str) -> dict[str, Any]:
    """An export request as the OTLP/JSON encoding writes it: hex ids, integer enums,
    64-bit integers as strings, lowerCamelCase names."""
    attrs = [
        {"key": "sagaadmin.saga.id", "value": {"stringValue": saga_id}},
        {"key": "sagaadmin.step.name", "value": {"stringValue": "reserve"}},
        {"key": "sagaadmin.step.attempt", "value": {"intValue": "3"}},
    ]
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "stock"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "stock"},
                        "spans": [
                            {
                                "traceId": TRACE,
                                "spanId": "eee19b7ec3c1b174",
                                "parentSpanId": "",
                                "name": "reserve",
                                "kind": 1,
                                "startTimeUnixNano": "1764150000000000000",
                                "endTimeUnixNano": "1764150000250000000",
                                "attributes": attrs,
                                "status": {"code": 2, "message": "no stock"},
                                "someFutureField": {"ignored": True},
                            }
                        ],
                    }
                ],
            }
        ]
    }


@pytest.fixture
def key(db: None) -> CreatedKey:
    return service_key_create(service_name="stock")


def _post(client: Client, key: CreatedKey, body: bytes, content_type: str, **extra: Any) -> Any:
    return client.post(
        "/api/v1/otlp/v1/traces",
        data=body,
        content_type=content_type,
        headers={"Authorization": f"Bearer {key.secret}", **extra},
    )


def _stored(saga_id: str, service: str = "stock") -> list[tuple[Any, ...]]:
    return list(
        TelemetryEvent.objects.filter(saga_id=saga_id, service__name=service)
        .order_by("event_id")
        .values_list("event_id", "type", "occurred_at", "step", "attempt", "trace_id", "error")
    )


def test_json_in_the_specifications_shape_parses_like_protobuf(client: Client, key: CreatedKey):
    body = json.dumps(_request_json("json-1")).encode()
    answer = _post(client, key, body, "application/json")
    assert answer.status_code == 200, answer.content
    assert answer["Content-Type"] == "application/json"
    assert json.loads(answer.content) == {}

    request = ExportTraceServiceRequest()
    json_format.ParseDict(
        json.loads(body.decode().replace(TRACE, "").replace("eee19b7ec3c1b174", "")),
        request,
        ignore_unknown_fields=True,
    )
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.trace_id, span.span_id = bytes.fromhex(TRACE), bytes.fromhex("eee19b7ec3c1b174")
    # the same spans from another service (event ids are unique per service)
    answer = _post(
        client, service_key_create(service_name="stock-pb"), request.SerializeToString(), PB
    )
    assert answer.status_code == 200
    assert answer["Content-Type"] == PB
    ExportTraceServiceResponse().ParseFromString(answer.content)

    from_json, from_pb = _stored("json-1"), _stored("json-1", "stock-pb")
    assert len(from_json) == 2
    assert from_json == from_pb  # same ids (from trace/span ids), times, attempt, error
    assert from_json[1][1:5] == ("step.started", from_json[1][2], "reserve", 3)
    assert from_json[0][1] == "step.failed"
    assert from_json[0][6] == {"type": "Error", "message": "no stock"}
    assert from_json[0][5] == TRACE


def test_a_bad_span_is_rejected_by_count_and_the_rest_is_stored(client: Client, key: CreatedKey):
    document = _request_json("partial-1")
    good = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    bad = json.loads(json.dumps(good))
    bad["spanId"] = "0000000000000bad"
    bad["attributes"].append({"key": "sagaadmin.step.phase", "value": {"stringValue": "sideways"}})
    document["resourceSpans"][0]["scopeSpans"][0]["spans"].append(bad)
    answer = _post(client, key, json.dumps(document).encode(), "application/json")
    assert answer.status_code == 200
    partial = json.loads(answer.content)["partialSuccess"]
    assert partial["rejectedSpans"] == "1"  # an int64: a string in OTLP/JSON
    assert "0000000000000bad" in partial["errorMessage"]
    assert "sagaadmin.step.phase" in partial["errorMessage"]
    assert len(_stored("partial-1")) == 2


def test_a_nul_in_a_span_rejects_that_span_and_nul_lookalike_text_is_stored(
    client: Client, key: CreatedKey
) -> None:
    """PostgreSQL stores no NUL: a span mapped to an event with one is rejected, naming
    the field; the text "\\u0000" (a backslash, no NUL) is data like any other."""
    document = _request_json("nul-1")
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    lookalike = spans[0]
    lookalike["status"]["message"] = "no stock \\u0000 left"
    nul = json.loads(json.dumps(lookalike))
    nul["spanId"] = "00000000000000a0"
    for attribute in nul["attributes"]:
        if attribute["key"] == "sagaadmin.step.name":
            attribute["value"]["stringValue"] = "re\x00serve"
    spans.append(nul)
    answer = _post(client, key, json.dumps(document).encode(), "application/json")
    assert answer.status_code == 200, answer.content
    partial = json.loads(answer.content)["partialSuccess"]
    assert partial["rejectedSpans"] == "1"
    assert "00000000000000a0" in partial["errorMessage"]
    assert "step: contains a NUL" in partial["errorMessage"]
    stored = _stored("nul-1")
    assert len(stored) == 2  # the look-alike span's step.started and step.failed
    assert {row[3] for row in stored} == {"reserve"}
    failed = next(row for row in stored if row[1] == "step.failed")
    assert failed[6]["message"] == "no stock \\u0000 left"


def _status(answer: Any) -> status_pb2.Status:
    status = status_pb2.Status()
    if answer["Content-Type"] == PB:
        status.ParseFromString(answer.content)
    else:
        json_format.Parse(answer.content, status)
    return status


@pytest.mark.parametrize(
    ("body", "content_type", "headers", "code", "says"),
    [
        (b"\x0a\xff\xff\xff", PB, {}, 400, "not an OTLP protobuf"),
        (b'{"resourceSpans": [', "application/json", {}, 400, "not JSON"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            "application/json",
            {},
            400,
            "traceId",
        ),
        (b"{}", "text/plain", {}, 415, "Content-Type must be"),
        (
            gzip.compress(b"\0" * (9 * 1024 * 1024)),
            PB,
            {"Content-Encoding": "gzip"},
            413,
            "decompresses to more than",
        ),
        (gzip.compress(b"abc")[:-6], PB, {"Content-Encoding": "gzip"}, 400, "truncated"),
        (b"x", PB, {"Content-Encoding": "br"}, 400, "Content-Encoding 'br'"),
    ],
)
def test_bad_input_gets_the_right_status_and_nothing_is_stored(
    client: Client,
    key: CreatedKey,
    body: bytes,
    content_type: str,
    headers: dict[str, str],
    code: int,
    says: str,
) -> None:
    answer = _post(client, key, body, content_type, **headers)
    assert answer.status_code == code, answer.content
    assert says in _status(answer).message
    assert TelemetryEvent.objects.count() == 0


def test_too_many_spans_and_a_missing_key_are_refused(
    client: Client, key: CreatedKey, settings: Any
) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, "OTLP_MAX_SPANS": 1}
    document = _request_json("many-1")
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans.append({**spans[0], "spanId": "00000000000000aa"})
    answer = _post(client, key, json.dumps(document).encode(), "application/json")
    assert answer.status_code == 413
    assert "at most 1" in _status(answer).message
    answer = client.post("/v1/traces", data=b"x", content_type=PB)
    assert answer.status_code == 401
    assert answer["Content-Type"] == PB
    assert "service key" in _status(answer).message
    assert TelemetryEvent.objects.count() == 0


def test_incidental_spans_of_a_saga_are_ignored(client: Client, key: CreatedKey) -> None:
    """An HTTP span that carries the saga id, or a broker ack with a conversation id, is
    neither a step nor the saga's own span: counted and ignored, not a saga that ended."""
    document = _request_json("incidental-1")
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    http = {**span, "spanId": "00000000000000a1", "status": {}}
    http["attributes"] = [{"key": "sagaadmin.saga.id", "value": {"stringValue": "incidental-1"}}]
    ack = {**span, "spanId": "00000000000000a2", "status": {}}
    ack["attributes"] = [
        {"key": "messaging.message.conversation_id", "value": {"stringValue": "incidental-1"}},
        {"key": "messaging.operation.type", "value": {"stringValue": "settle"}},
    ]
    document["resourceSpans"][0]["scopeSpans"][0]["spans"] = [http, ack]
    answer = _post(client, key, json.dumps(document).encode(), "application/json")
    assert answer.status_code == 200
    assert json.loads(answer.content) == {}
    assert TelemetryEvent.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_asgi_fast_path_answers_otlp_like_the_view() -> None:
    """Production serves /v1/traces from the group-committing ASGI endpoint: same answers."""
    import asyncio

    from tests.tracking.test_fastpath import asgi_post
    from tracking.api.fastpath import IngestEndpoint

    key = service_key_create(service_name="stock")
    endpoint = IngestEndpoint()

    async def call(path: str, body: bytes, content_type: str, secret: str | None) -> Any:
        headers = {"content-type": content_type}
        if secret:
            headers["authorization"] = f"Bearer {secret}"
        return await asgi_post(endpoint, path, body, headers)

    try:
        body = json.dumps(_request_json("fast-1")).encode()
        status, head, answer = asyncio.run(call("/v1/traces", body, "application/json", key.secret))
        assert (status, head["content-type"], json.loads(answer)) == (200, "application/json", {})
        assert len(_stored("fast-1")) == 2
        status, head, answer = asyncio.run(
            call("/api/v1/otlp/v1/traces", b"\x0a\xff", PB, key.secret)
        )
        assert status == 400 and head["content-type"] == PB
        status, _, answer = asyncio.run(call("/v1/traces", body, PB, None))
        assert status == 401
        assert "service key" in _status_of(PB, answer).message
    finally:
        endpoint.batcher.close()


def _status_of(content_type: str, body: bytes) -> status_pb2.Status:
    status = status_pb2.Status()
    status.ParseFromString(body)
    return status


def test_otlp_events_are_counted_on_metrics(client: Client, key: CreatedKey) -> None:
    from prometheus_client import REGISTRY

    def accepted() -> float:
        value = REGISTRY.get_sample_value("sagaadmin_ingest_events_total", {"result": "accepted"})
        return value or 0.0

    before = accepted()
    body = json.dumps(_request_json("counted-1")).encode()
    assert _post(client, key, body, "application/json").status_code == 200
    assert accepted() - before == 2
