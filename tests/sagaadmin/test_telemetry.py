"""Saga Admin's own tracing: the switch, propagation through outbox and orchestrator, logs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import outbox
from orchestrator.engine import saga_start
from orchestrator.worker import Worker
from outbox.consumers import run_inprocess_consumer
from outbox.inbox import Incoming
from outbox.models import OutboxMessage
from outbox.relay import Relay
from outbox.transports.inprocess import InProcessTransport
from sagaadmin import telemetry
from sagaclient import Reporter
from tracking.models import Saga


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """A real SDK tracer with an in-memory exporter, standing in for the global one."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(telemetry, "TRACER", tracer)
    yield tracer, memory
    provider.shutdown()


def test_tracing_is_off_unless_otel_variables_ask_for_it() -> None:
    assert not telemetry.wanted({})
    assert not telemetry.wanted({"LOG_LEVEL": "INFO"})
    assert telemetry.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert telemetry.wanted({"OTEL_SERVICE_NAME": "sagaadmin-eu"})
    assert not telemetry.wanted({"OTEL_SERVICE_NAME": "x", "OTEL_SDK_DISABLED": "true"})
    assert not telemetry.wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not telemetry.enabled()  # the test run sets none of them


@pytest.mark.django_db(transaction=True)
def test_a_message_published_and_consumed_through_the_inbox_carries_one_trace(
    spans: tuple[Any, InMemorySpanExporter],
) -> None:
    tracer, memory = spans
    got: list[Incoming] = []
    stop = threading.Event()
    consumer = threading.Thread(
        target=run_inprocess_consumer,
        kwargs={"consumer": "billing", "topic": "t.traced", "handler": got.append, "stop": stop},
    )
    consumer.start()
    time.sleep(0.2)  # subscribed
    try:
        with tracer.start_as_current_span("place order") as root, transaction.atomic():
            message = outbox.publish(topic="t.traced", key="o-1", type="order.placed", payload={})
        trace_id = f"{root.get_span_context().trace_id:032x}"
        assert message.headers["traceparent"].split("-")[1] == trace_id
        Relay(InProcessTransport()).drain()
    finally:
        stop.set()
        consumer.join(5)
    assert [m.id for m in got] == [str(message.message_id)]
    assert got[0].headers["traceparent"] == message.headers["traceparent"]
    finished = {s.name: s for s in memory.get_finished_spans()}
    process, publish = finished["t.traced process"], finished["outbox publish"]
    assert process.context.trace_id == root.get_span_context().trace_id  # one trace
    assert process.parent.span_id == root.get_span_context().span_id
    assert [link.context.span_id for link in process.links] == [root.get_span_context().span_id]
    assert process.attributes["messaging.message.id"] == str(message.message_id)
    assert [link.context.trace_id for link in publish.links] == [process.context.trace_id]


@pytest.mark.django_db
def test_an_orchestrated_saga_continues_the_trace_it_was_started_in(
    spans: tuple[Any, InMemorySpanExporter], test_sagas: Any
) -> None:
    tracer, memory = spans
    with tracer.start_as_current_span("POST /orders") as root:
        saga_start(saga_type="test-remote", saga_id="traced-1", data={"amount": 5})
    trace_id = f"{root.get_span_context().trace_id:032x}"
    Worker().drain()  # later, in a worker, outside any request
    command = OutboxMessage.objects.get(aggregatetype="sagaadmin.commands")
    assert command.headers["traceparent"].split("-")[1] == trace_id
    assert json.loads(command.payload)["saga_id"] == "traced-1"
    assert Saga.objects.get(saga_id="traced-1").trace_ids == [trace_id]
    names = [s.name for s in memory.get_finished_spans()]
    assert "orchestrator transition" in names and "ingest batch" in names


def test_sagaclient_reports_carry_the_current_trace(spans: tuple[Any, Any]) -> None:
    tracer, _ = spans
    reporter = Reporter("http://127.0.0.1:9", "sa_x", start=False)
    with tracer.start_as_current_span("charge") as current:
        reporter.event("step.started", "s-1", step="charge")
    outside = reporter.event("step.succeeded", "s-1", step="charge")
    queued = list(reporter._queue)
    context = current.get_span_context()
    assert queued[0]["trace_id"] == f"{context.trace_id:032x}"
    assert queued[0]["span_id"] == f"{context.span_id:016x}"
    assert queued[1]["id"] == outside and "trace_id" not in queued[1]


def test_log_records_carry_trace_and_span_ids(spans: tuple[Any, Any]) -> None:
    tracer, _ = spans
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    flt = telemetry.TraceIdFilter()
    flt.filter(record)
    assert record.trace == ""  # type: ignore[attr-defined]
    with tracer.start_as_current_span("work") as current:
        flt.filter(record)
    context = current.get_span_context()
    assert record.trace == f" trace={context.trace_id:032x} span={context.span_id:016x}"  # type: ignore[attr-defined]


@pytest.mark.django_db(transaction=True)
def test_the_ingest_fast_path_continues_the_callers_trace(
    spans: tuple[Any, InMemorySpanExporter],
) -> None:
    import asyncio

    from tests.tracking.test_fastpath import asgi_post
    from tracking.api.fastpath import IngestEndpoint
    from tracking.keys import service_key_create

    _, memory = spans
    key = service_key_create(service_name="payment").secret
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = json.dumps(
        {
            "events": [
                {
                    "id": "t1",
                    "saga_id": "tr-1",
                    "saga_type": "t",
                    "type": "saga.started",
                    "occurred_at": "2026-11-26T10:00:00Z",
                }
            ]
        }
    ).encode()
    endpoint = IngestEndpoint()

    async def call() -> int:
        headers = {
            "content-type": "application/json",
            "authorization": f"Bearer {key}",
            "traceparent": f"00-{trace_id}-{parent}-01",
        }
        status, _, _ = await asgi_post(endpoint, "/api/v1/events", body, headers)
        return status

    try:
        assert asyncio.run(call()) == 200
    finally:
        endpoint.batcher.close()
    finished = {s.name: s for s in memory.get_finished_spans()}
    server = finished["POST /api/v1/events"]
    assert f"{server.context.trace_id:032x}" == trace_id
    assert f"{server.parent.span_id:016x}" == parent
    assert server.attributes["http.response.status_code"] == 200
    assert finished["ingest batch"].context.trace_id == server.context.trace_id
