"""``POST /api/v1/otlp/v1/traces`` (and ``/v1/traces``): OTLP/HTTP traces as saga telemetry.

Answers as the OTLP/HTTP specification says, in the request's encoding
(``application/x-protobuf`` or ``application/json``): 200 with an
``ExportTraceServiceResponse`` (``partial_success`` counts the spans whose
events were rejected, with the reasons), 400 / 401 / 413 / 415 / 503 with a
``google.rpc.Status`` body, 503 with ``Retry-After`` when the database is
away. Nothing of a request that fails as a whole is stored. The service is
the key's (docs/opentelemetry.md).
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from tracking import otlp
from tracking.api.auth import bearer_token
from tracking.api.ingest import DB_UNAVAILABLE, Reply, http_response
from tracking.ingest import REJECTED, IngestResult, RawEvent, events_ingest
from tracking.keys import service_key_authenticate
from tracking.metrics import ingest_observed

log = logging.getLogger(__name__)

# google.rpc codes used in Status bodies
INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE = 3, 16, 8, 14


class OtlpRefused(Exception):
    """A request refused as a whole; ``reply`` is the answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _status(status: int, content_type: str, code: int, message: str, **headers: str) -> OtlpRefused:
    body = otlp.status_bytes(content_type, code=code, message=message)
    return OtlpRefused(
        Reply(status, body, content_type, {k.replace("_", "-"): v for k, v in headers.items()})
    )


def otlp_request_check(*, method: str, content_type: str, has_token: bool) -> str:
    """Method, media type and credentials (before the body is read); the answer encoding."""
    if method != "POST":
        raise _status(405, otlp.JSON, INVALID_ARGUMENT, "use POST to export traces", Allow="POST")
    if content_type not in otlp.ENCODINGS:
        raise _status(
            415,
            otlp.JSON,
            INVALID_ARGUMENT,
            f"Content-Type must be {otlp.PROTOBUF} or {otlp.JSON}, not '{content_type or 'none'}'",
        )
    if not has_token:
        raise unauthenticated(content_type)
    return content_type


def unauthenticated(content_type: str) -> OtlpRefused:
    return _status(
        401,
        content_type,
        UNAUTHENTICATED,
        "send a Saga Admin service key: 'Authorization: Bearer sa_...'",
        WWW_Authenticate='Bearer realm="sagaadmin"',
    )


def otlp_map(body: bytes, *, content_type: str, content_encoding: str) -> otlp.Mapped:
    """Size, decode and map the body; raises :class:`OtlpRefused`."""
    cfg = settings.SAGAADMIN
    limit = cfg["INGEST_MAX_BODY_BYTES"]  # the ASGI guard stops it earlier; this covers WSGI
    if len(body) > limit:
        raise _status(413, content_type, RESOURCE_EXHAUSTED, f"The body exceeds {limit} bytes.")
    try:
        export = otlp.request_decode(
            body,
            content_type=content_type,
            content_encoding=content_encoding,
            max_bytes=cfg["OTLP_MAX_BYTES"],
        )
    except otlp.TooLarge as exc:
        raise _status(413, content_type, RESOURCE_EXHAUSTED, str(exc)) from None
    except otlp.BadRequest as exc:
        raise _status(400, content_type, INVALID_ARGUMENT, str(exc)) from None
    mapped = otlp.spans_map(export)
    if mapped.spans > cfg["OTLP_MAX_SPANS"]:
        raise _status(
            413,
            content_type,
            RESOURCE_EXHAUSTED,
            f"{mapped.spans} spans in one request; at most {cfg['OTLP_MAX_SPANS']}",
        )
    if mapped.ignored:
        log.debug("otlp: %d spans without saga attributes ignored", mapped.ignored)
    return mapped


def otlp_raws(mapped: otlp.Mapped) -> list[RawEvent]:
    """The mapped events as they are: ingest validates dicts without a JSON round trip."""
    return list(mapped.events)


def otlp_unavailable(content_type: str, exc: Exception) -> Reply:
    log.warning("otlp: database unavailable: %s", exc)
    return _status(
        503,
        content_type,
        UNAVAILABLE,
        "the event store is unavailable; nothing was stored, retry later",
        Retry_After=str(settings.SAGAADMIN["RETRY_AFTER_SECONDS"]),
    ).reply


def otlp_overloaded(content_type: str, why: str) -> Reply:
    """429 with ``Retry-After``: the exporter keeps the batch and sends it again later."""
    return _status(
        429,
        content_type,
        RESOURCE_EXHAUSTED,
        f"ingest is behind ({why}); nothing was stored, retry later",
        Retry_After=str(settings.SAGAADMIN["RETRY_AFTER_SECONDS"]),
    ).reply


def otlp_answer(mapped: otlp.Mapped, result: IngestResult | None, content_type: str) -> Reply:
    """200 with ``partial_success`` counting the spans whose events were refused."""
    reasons = dict(mapped.invalid)
    for event_result in result.results if result is not None else ():
        if event_result.status == REJECTED:
            span = mapped.span_of[event_result.index]
            why = "; ".join(f"{e.field}: {e.message}" for e in event_result.errors)
            reasons.setdefault(span, why)
    message = "; ".join(
        f"span {mapped.span_ids[i]}: {why}" for i, why in sorted(reasons.items())[:10]
    )
    if len(reasons) > 10:
        message += f"; and {len(reasons) - 10} more"
    body = otlp.response_bytes(content_type, rejected=len(reasons), message=message)
    # the events' results go to /metrics with the REST endpoint's (none: nothing to count)
    return Reply(200, body, content_type, result=result or IngestResult([]))


@csrf_exempt
def otlp_traces_view(request: HttpRequest) -> HttpResponse:
    """The Django door (WSGI, tests, and ASGI when the fast path is off)."""
    started = time.perf_counter()
    reply = _traces(request)
    ingest_observed(reply, time.perf_counter() - started)
    return http_response(reply)


def _traces(request: HttpRequest) -> Reply:
    content_type = (request.content_type or "").lower()
    token = bearer_token(request)
    try:
        otlp_request_check(
            method=request.method or "", content_type=content_type, has_token=bool(token)
        )
        key = service_key_authenticate(secret=token or "")
        if key is None:
            raise unauthenticated(content_type)
        try:
            body = request.body
        except RequestDataTooBig:
            limit = settings.SAGAADMIN["INGEST_MAX_BODY_BYTES"]
            raise _status(
                413, content_type, RESOURCE_EXHAUSTED, f"The body exceeds {limit} bytes."
            ) from None
        mapped = otlp_map(
            body,
            content_type=content_type,
            content_encoding=request.headers.get("Content-Encoding", ""),
        )
    except OtlpRefused as refused:
        return refused.reply
    result = None
    if mapped.events:
        try:
            with transaction.atomic(durable=True):
                result = events_ingest(service=key.service, raws=otlp_raws(mapped))
        except DB_UNAVAILABLE as exc:
            return otlp_unavailable(content_type, exc)
    return otlp_answer(mapped, result, content_type)
