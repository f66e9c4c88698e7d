"""OTLP/HTTP traces as saga telemetry: decode an export request, map spans to protocol events.

The receiver (``tracking/api/otlp.py``) calls :func:`request_decode`, then
:func:`spans_map`, ingests the events with the REST endpoint's
:func:`~tracking.ingest.events_ingest`, and answers with
:func:`response_bytes` / :func:`status_bytes` in the request's encoding.

Mapping (docs/opentelemetry.md has the table): a span with
``sagaadmin.saga.id`` (or ``messaging.message.conversation_id``) is saga
telemetry, anything else is counted and ignored:

* with ``sagaadmin.step.name``: ``step.started`` at its start and
  ``step.succeeded`` / ``step.failed`` (status ERROR; the ``exception``
  event's type and message are the error) at its end —
  ``compensation.*`` when ``sagaadmin.step.phase`` is ``compensation``;
* a messaging span (``messaging.operation.type`` ``send`` / ``publish`` or
  ``process`` / ``deliver`` / ``receive``): ``message.published`` /
  ``message.consumed``;
* the saga's own span, marked ``sagaadmin.saga.root=true`` or carrying
  ``sagaadmin.saga.outcome``: ``saga.started`` at its start, at its end the
  outcome (``completed``, ``compensated``, ``failed``, ``compensation_failed``,
  ``cancelled``) or else completed / failed by status;
* any other span with a saga id (an HTTP call inside a step) is ignored too.

Event ids derive from the trace and span ids (``otel-<trace>-<span>-start``), so
an exporter that retries a batch reports duplicates, never new events.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ENCODINGS = (PROTOBUF, JSON)
SAGA_ID_KEYS = ("sagaadmin.saga.id", "messaging.message.conversation_id")
PUBLISH_OPERATIONS = frozenset({"send", "publish", "create"})
CONSUME_OPERATIONS = frozenset({"process", "deliver", "receive"})
OUTCOMES = {
    "completed": "saga.completed",
    "compensated": "saga.compensated",
    "failed": "saga.failed",
    "compensation_failed": "saga.compensation_failed",
    "cancelled": "saga.cancelled",
}
# ids in OTLP/JSON are hex, where proto3 JSON would have base64 (the spec's difference)
_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


class BadRequest(ValueError):
    """The body cannot be decoded: 400 (with the reason)."""


class TooLarge(ValueError):
    """The body decompresses to more than allowed: 413."""


def request_decode(
    body: bytes, *, content_type: str, content_encoding: str, max_bytes: int
) -> ExportTraceServiceRequest:
    """Decompress (``gzip``/``deflate``, checked against ``max_bytes`` while inflating) and
    parse the protobuf or JSON encoding. Raises :class:`BadRequest` or :class:`TooLarge`."""
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "deflate"):
        body = _inflate(body, max_bytes=max_bytes, gzip=encoding == "gzip")
    elif encoding not in ("", "identity"):
        raise BadRequest(f"Content-Encoding '{encoding}' is not supported (gzip or none)")
    if len(body) > max_bytes:
        raise TooLarge(f"the request is larger than {max_bytes} bytes")
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise BadRequest(f"not an OTLP protobuf ExportTraceServiceRequest: {exc}") from None
        return request
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("an OTLP/JSON ExportTraceServiceRequest is an object")
    try:
        json_format.ParseDict(_hex_ids_to_base64(document), request, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise BadRequest(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    return request


def _inflate(body: bytes, *, max_bytes: int, gzip: bool) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {'gzip' if gzip else 'deflate'}: {exc}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise TooLarge(f"the request decompresses to more than {max_bytes} bytes")
    if not inflater.eof:
        raise BadRequest(f"the {'gzip' if gzip else 'deflate'} body is truncated")
    return out


def _hex_ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    value = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise BadRequest(f"{key}: '{value[:40]}' is not hex") from None
            out[key] = _hex_ids_to_base64(value)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(item) for item in node]
    return node


# -- mapping ------------------------------------------------------------------------------


@dataclass
class Mapped:
    """The events of a request's saga spans; ``span_of[i]`` is the span index of event i."""

    events: list[dict[str, Any]] = field(default_factory=list)
    span_of: list[int] = field(default_factory=list)
    span_ids: list[str] = field(default_factory=list)
    spans: int = 0
    ignored: int = 0  # no saga attributes
    invalid: dict[int, str] = field(default_factory=dict)  # span index -> why


def spans_map(request: ExportTraceServiceRequest) -> Mapped:
    out = Mapped()
    events, span_of, span_ids = out.events, out.span_of, out.span_ids
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                index = out.spans
                out.spans += 1
                span_id = span.span_id.hex()
                span_ids.append(span_id)
                try:
                    mapped = span_events(span, span_id)
                except ValueError as exc:
                    out.invalid[index] = str(exc)
                    continue
                if mapped is None:
                    out.ignored += 1
                    continue
                events += mapped
                span_of += [index] * len(mapped)
    return out


def span_events(span: Span, span_id: str | None = None) -> list[dict[str, Any]] | None:
    """The protocol events of one span; None when it carries no saga id.

    Runs for every span of every export, so it is written for speed: one dict of
    attributes, each event dict built in one expression.
    """
    attrs = _attributes(span.attributes)
    get = attrs.get
    operation = get("messaging.operation.type") or get("messaging.operation")
    publish = operation in PUBLISH_OPERATIONS
    messaging = publish or operation in CONSUME_OPERATIONS
    saga_id = get("sagaadmin.saga.id")
    if saga_id in (None, "") and messaging:  # a conversation id names a saga on messages only
        saga_id = get("messaging.message.conversation_id")
    if saga_id in (None, ""):
        return None
    step = get("sagaadmin.step.name")
    has_step = step not in (None, "")
    root = get("sagaadmin.saga.root") is True or "sagaadmin.saga.outcome" in attrs
    if not has_step and not messaging and not root:
        return None  # an incidental span of the saga (an HTTP call, an ack): not an event
    if len(span.trace_id) != 16 or len(span.span_id) != 8:
        raise ValueError("trace_id must be 16 bytes and span_id 8")
    start_nano = span.start_time_unix_nano
    if not start_nano:
        raise ValueError("start_time_unix_nano: missing")
    trace = span.trace_id.hex()
    if span_id is None:
        span_id = span.span_id.hex()
    prefix = f"otel-{trace}-{span_id}-"
    base: dict[str, Any] = {"saga_id": str(saga_id), "trace_id": trace, "span_id": span_id}
    saga_type = get("sagaadmin.saga.type")
    if saga_type:
        base["saga_type"] = str(saga_type)
    end_nano = span.end_time_unix_nano
    start = _time(start_nano)
    failed = span.status.code == Status.STATUS_CODE_ERROR

    if has_step:
        phase = get("sagaadmin.step.phase", "forward")
        if phase == "forward":
            kind = "step"
        elif phase == "compensation":
            kind = "compensation"
        else:
            raise ValueError(f"sagaadmin.step.phase: 'forward' or 'compensation', not '{phase}'")
        try:
            attempt = int(get("sagaadmin.step.attempt", 1))
        except (TypeError, ValueError):
            raise ValueError("sagaadmin.step.attempt: a whole number") from None
        step = str(step)
        events = [
            {
                "id": prefix + "start",
                "type": kind + ".started",
                "occurred_at": start,
                **base,
                "step": step,
                "attempt": attempt,
            }
        ]
        if end_nano:
            end_event = {
                "id": prefix + "end",
                "type": kind + (".failed" if failed else ".succeeded"),
                "occurred_at": _time(end_nano),
                **base,
                "step": step,
                "attempt": attempt,
            }
            if failed:
                end_event["error"] = _error(span)
            events.append(end_event)
        return events
    if messaging:
        message = {
            "name": str(get("messaging.destination.name") or span.name)[:200],
            "id": str(get("messaging.message.id") or span_id)[:200],
        }
        return [
            {
                "id": prefix + "msg",
                "type": "message.published" if publish else "message.consumed",
                "occurred_at": start,
                **base,
                "message": message,
            }
        ]
    events = [{"id": prefix + "start", "type": "saga.started", "occurred_at": start, **base}]
    if end_nano:
        outcome = get("sagaadmin.saga.outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(
                f"sagaadmin.saga.outcome: one of {', '.join(OUTCOMES)}, not '{outcome}'"
            )
        type = OUTCOMES[outcome] if outcome else ("saga.failed" if failed else "saga.completed")
        end_event = {"id": prefix + "end", "type": type, "occurred_at": _time(end_nano), **base}
        if type != "saga.completed" and failed:
            end_event["error"] = _error(span)
        events.append(end_event)
    return events


def _error(span: Span) -> dict[str, Any]:
    """The ``exception`` event's type and message, else the status message."""
    for span_event in span.events:
        if span_event.name == "exception":
            attrs = _attributes(span_event.attributes)
            return {
                "type": str(attrs.get("exception.type") or "Exception")[:200],
                "message": str(attrs.get("exception.message") or span.status.message)[:4000],
            }
    return {"type": "Error", "message": (span.status.message or f"{span.name} failed")[:4000]}


_SIMPLE_VALUES = frozenset({"string_value", "bool_value", "int_value", "double_value"})


def _attributes(pairs: Any) -> dict[str, Any]:
    out = {}
    for kv in pairs:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = getattr(value, kind) if kind in _SIMPLE_VALUES else any_value(value)
    return out


_seconds: dict[int, str] = {}


def _time(unix_nano: int) -> str:
    """RFC 3339 in UTC, exact to the microsecond (a float of the nanoseconds would not be);
    built by hand, the date and time of day cached per second: it runs twice per span."""
    seconds, nanos = divmod(unix_nano, 1_000_000_000)
    whole = _seconds.get(seconds)
    if whole is None:
        if len(_seconds) > 4096:
            _seconds.clear()
        t = time.gmtime(seconds)
        whole = _seconds[seconds] = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
        )
    return f"{whole}{nanos // 1000:06d}Z"


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


# -- answers ------------------------------------------------------------------------------


def response_bytes(content_type: str, *, rejected: int, message: str) -> bytes:
    """An ExportTraceServiceResponse (``partial_success`` only when something was rejected)."""
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    return _encode(response, content_type)


def status_bytes(content_type: str, *, code: int, message: str) -> bytes:
    """A google.rpc.Status for an error answer (code: a gRPC code, e.g. 3 INVALID_ARGUMENT)."""
    return _encode(status_pb2.Status(code=code, message=message), content_type)


def _encode(message: Any, content_type: str) -> bytes:
    if content_type == PROTOBUF:
        return bytes(message.SerializeToString())
    return json.dumps(json_format.MessageToDict(message)).encode()
