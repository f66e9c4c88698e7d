"""Saga Admin's own OpenTelemetry: spans, W3C trace context propagation, trace ids in logs.

Tracing is **off** unless the standard ``OTEL_*`` environment variables ask
for it (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_TRACES_EXPORTER`` or ``OTEL_SERVICE_NAME``; ``OTEL_SDK_DISABLED=true``
wins). Then :func:`setup` installs the SDK with a batching OTLP/HTTP exporter
that reads the usual variables itself, Django requests get server spans
(:class:`TracingMiddleware`), every SQL statement a client span (a Django
execute wrapper on each new connection: psycopg's and SQLite's alike), and the
product's own spans (``span()``: ingest, projection, relay publishes, consumed
messages, orchestrator steps, operator actions) carry ``sagaadmin.*``
attributes.

Propagation works whether or not tracing is on: a ``traceparent`` that arrives
(an HTTP request, a message's headers) is carried on into every outbox message
published under it (:func:`headers_with_context`), and consumers continue the
producer's trace (:func:`consumer_span`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind

log = logging.getLogger(__name__)
TRACER = trace.get_tracer("sagaadmin")
ENV_SWITCHES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
)
_lock = threading.Lock()
_enabled = False


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the ``OTEL_*`` variables ask for tracing."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in ENV_SWITCHES)


def enabled() -> bool:
    return _enabled


def setup(environ: Mapping[str, str] = os.environ) -> bool:
    """Install the SDK once per process when the environment asks for it; True if on."""
    global _enabled
    with _lock:
        if _enabled or not wanted(environ):
            return _enabled
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        exporter: SpanExporter
        if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "sagaadmin")})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        database_spans_install()
        _enabled = True
    log.info("telemetry: tracing on, exporting with %s", type(exporter).__name__)
    return True


# -- spans of our own ---------------------------------------------------------------------


def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Any:
    """A span named ``name`` with ``sagaadmin.<key>`` attributes (None values left out)."""
    return TRACER.start_as_current_span(
        name,
        kind=kind,
        attributes={f"sagaadmin.{k}": v for k, v in attributes.items() if v is not None},
    )


# -- propagation ------------------------------------------------------------------------


def headers_with_context(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` plus the current ``traceparent`` (and ``tracestate``) unless they have one."""
    out = dict(headers or {})
    if "traceparent" not in out:
        propagate.inject(out)
    return out


def traceparent() -> str:
    """The current context as a ``traceparent`` header value ("" when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def current_ids() -> tuple[str, str] | None:
    """The current span's (trace id, span id) in hex, or None outside a valid one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


@contextlib.contextmanager
def continued(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Run the block in the trace context ``carrier`` (a ``traceparent`` header) names."""
    if not carrier or not carrier.get("traceparent"):
        yield
        return
    token = otel_context.attach(propagate.extract(dict(carrier)))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def consumer_span(
    topic: str, message_id: str, headers: Mapping[str, Any] | None, consumer: str
) -> Iterator[Any]:
    """The span of applying one consumed message: a child of the producer's context, linked
    to it too (the messaging conventions' way), so producer and consumer share one trace."""
    carrier = {k: str(v) for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}
    parent = propagate.extract(carrier) if carrier else None
    producer = trace.get_current_span(parent).get_span_context() if parent else None
    links = [Link(producer)] if producer is not None and producer.is_valid else []
    with TRACER.start_as_current_span(
        f"{topic} process",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes={
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.message.id": message_id,
            "messaging.consumer.group.name": consumer,
        },
    ) as current:
        yield current


@contextlib.contextmanager
def publish_span(headers: list[Mapping[str, str]], system: str) -> Iterator[Any]:
    """The relay's span around one batch sent to the broker, linked to (up to 128 of) the
    contexts its messages were published in (only when the span records: no cost when off)."""
    with TRACER.start_as_current_span(
        "outbox publish",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.operation.type": "send",
            "messaging.system": system,
            "messaging.batch.message_count": len(headers),
        },
    ) as current:
        if current.is_recording():
            for carrier in headers[:128]:
                if carrier.get("traceparent"):
                    producer = trace.get_current_span(propagate.extract(dict(carrier)))
                    if producer.get_span_context().is_valid:
                        current.add_link(producer.get_span_context())
        yield current


# -- Django requests and SQL ----------------------------------------------------------------


class TracingMiddleware:
    """A server span per request, continuing the caller's ``traceparent`` (tracing on only)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from django.core.exceptions import MiddlewareNotUsed

        if not setup():
            raise MiddlewareNotUsed
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        carrier = {"traceparent": request.headers.get("traceparent", "")}
        if request.headers.get("tracestate"):
            carrier["tracestate"] = request.headers["tracestate"]
        parent = propagate.extract(carrier) if carrier["traceparent"] else None
        with TRACER.start_as_current_span(
            f"{request.method} {request.path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path},
        ) as current:
            response = self.get_response(request)
            current.set_attribute("http.response.status_code", response.status_code)
            match = getattr(request, "resolver_match", None)
            if match is not None and match.route:
                current.update_name(f"{request.method} {match.route}")
                current.set_attribute("http.route", match.route)
            if response.status_code >= 500:
                current.set_status(trace.StatusCode.ERROR)
            return response


@contextlib.contextmanager
def server_span(method: str, route: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """A server span for a request served outside Django (the ASGI ingest fast path),
    continuing the caller's ``traceparent``; ``headers`` with lower-case names."""
    carrier = {k: headers[k] for k in ("traceparent", "tracestate") if headers.get(k)}
    with TRACER.start_as_current_span(
        f"{method} {route}",
        context=propagate.extract(carrier) if carrier else None,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route, "url.path": route},
    ) as current:
        yield current


def _sql_span(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    connection = context["connection"]
    with TRACER.start_as_current_span(
        sql.split(None, 1)[0].upper() if sql else "SQL",
        kind=SpanKind.CLIENT,
        attributes={
            "db.system.name": connection.vendor,
            "db.query.text": sql[:2000],
            "db.namespace": str(connection.settings_dict.get("NAME", "")),
        },
    ):
        return execute(sql, params, many, context)


def _on_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _sql_span not in connection.execute_wrappers:
        connection.execute_wrappers.append(_sql_span)


def database_spans_install() -> None:
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection, dispatch_uid="sagaadmin.telemetry.sql")


# -- logs ---------------------------------------------------------------------------------


class TraceIdFilter(logging.Filter):
    """Adds ``%(trace)s`` to log records: `` trace=<id> span=<id>`` inside a span, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace = (
            f" trace={context.trace_id:032x} span={context.span_id:016x}"
            if context.is_valid
            else ""
        )
        return True
