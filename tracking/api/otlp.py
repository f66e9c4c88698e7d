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

import msgspec
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from tracking import otlp
from tracking.api.auth import bearer_token
from tracking.api.ingest import DB_UNAVAILABLE
from tracking.ingest import REJECTED, events_ingest
from tracking.keys import service_key_authenticate

log = logging.getLogger(__name__)

# google.rpc codes used in Status bodies
INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE = 3, 16, 8, 14


def _answer(
    status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None
) -> HttpResponse:
    response = HttpResponse(body, status=status, content_type=content_type)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _error(status: int, content_type: str, code: int, message: str, **headers: str) -> HttpResponse:
    body = otlp.status_bytes(content_type, code=code, message=message)
    return _answer(status, content_type, body, {k.replace("_", "-"): v for k, v in headers.items()})


@csrf_exempt
def otlp_traces_view(request: HttpRequest) -> HttpResponse:
    content_type = (request.content_type or "").lower()
    if request.method != "POST":
        response = _error(405, otlp.JSON, INVALID_ARGUMENT, "use POST to export traces")
        response["Allow"] = "POST"
        return response
    if content_type not in otlp.ENCODINGS:
        return _error(
            415,
            otlp.JSON,
            INVALID_ARGUMENT,
            f"Content-Type must be {otlp.PROTOBUF} or {otlp.JSON}, not '{content_type or 'none'}'",
        )
    token = bearer_token(request)
    key = service_key_authenticate(secret=token) if token else None
    if key is None:
        return _error(
            401,
            content_type,
            UNAUTHENTICATED,
            "send a Saga Admin service key: 'Authorization: Bearer sa_...'",
            WWW_Authenticate='Bearer realm="sagaadmin"',
        )
    cfg = settings.SAGAADMIN
    limit = cfg["INGEST_MAX_BODY_BYTES"]  # the ASGI guard stops it earlier; this covers WSGI
    too_large = f"The body exceeds {limit} bytes."
    try:
        if int(request.META.get("CONTENT_LENGTH") or 0) > limit or len(request.body) > limit:
            return _error(413, content_type, RESOURCE_EXHAUSTED, too_large)
    except (RequestDataTooBig, ValueError):
        return _error(413, content_type, RESOURCE_EXHAUSTED, too_large)
    try:
        export = otlp.request_decode(
            request.body,
            content_type=content_type,
            content_encoding=request.headers.get("Content-Encoding", ""),
            max_bytes=cfg["OTLP_MAX_BYTES"],
        )
    except otlp.TooLarge as exc:
        return _error(413, content_type, RESOURCE_EXHAUSTED, str(exc))
    except otlp.BadRequest as exc:
        return _error(400, content_type, INVALID_ARGUMENT, str(exc))
    mapped = otlp.spans_map(export)
    if mapped.spans > cfg["OTLP_MAX_SPANS"]:
        return _error(
            413,
            content_type,
            RESOURCE_EXHAUSTED,
            f"{mapped.spans} spans in one request; at most {cfg['OTLP_MAX_SPANS']}",
        )
    reasons = dict(mapped.invalid)
    if mapped.events:
        try:
            with transaction.atomic(durable=True):
                result = events_ingest(
                    service=key.service, raws=[msgspec.json.encode(e) for e in mapped.events]
                )
        except DB_UNAVAILABLE as exc:
            log.warning("otlp: database unavailable: %s", exc)
            return _error(
                503,
                content_type,
                UNAVAILABLE,
                "the event store is unavailable; nothing was stored, retry later",
                Retry_After=str(cfg["RETRY_AFTER_SECONDS"]),
            )
        for event_result in result.results:
            if event_result.status == REJECTED:
                span = mapped.span_of[event_result.index]
                why = "; ".join(f"{e.field}: {e.message}" for e in event_result.errors)
                reasons.setdefault(span, why)
    if mapped.ignored:
        log.debug("otlp: %d spans without saga attributes ignored", mapped.ignored)
    message = "; ".join(
        f"span {mapped.span_ids[i]}: {why}" for i, why in sorted(reasons.items())[:10]
    )
    if len(reasons) > 10:
        message += f"; and {len(reasons) - 10} more"
    body = otlp.response_bytes(content_type, rejected=len(reasons), message=message)
    return _answer(200, content_type, body)
