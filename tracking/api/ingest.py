"""``POST /api/v1/events``: the telemetry endpoint.

The checks and answers live in framework-neutral functions that return a
:class:`Reply`, used by two front doors with identical behaviour:

- :func:`events_view`, a plain Django view (WSGI, the test client, and ASGI
  when the fast path is off);
- :mod:`tracking.api.fastpath`, the ASGI endpoint production uses, which
  group-commits concurrent requests (docs/decisions/0008-ingest-fast-path.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import msgspec
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from sagaadmin.problems import PROBLEM_CONTENT_TYPE, problem_bytes
from tracking import metrics
from tracking.api.auth import bearer_token
from tracking.ingest import ACCEPTED, DUPLICATE, REJECTED, IngestResult, events_ingest
from tracking.keys import service_key_authenticate
from tracking.protocol import RequestMalformed, TooManyEvents, split_body

log = logging.getLogger(__name__)
DB_UNAVAILABLE = (OperationalError, InterfaceError)  # refused, lost, timed out, deadlock


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = PROBLEM_CONTENT_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    # the events' results when they were processed (200, 422): for tracking/metrics.py
    result: IngestResult | None = field(default=None, repr=False, compare=False)


class Refused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def problem(
    status: int, slug: str, detail: str, headers: dict[str, str] | None = None, **extra: object
) -> Reply:
    return Reply(status, problem_bytes(status, slug, detail, **extra), headers=headers or {})


def request_check(*, method: str, content_type: str, token: str | None) -> str:
    """Method, media type and credentials; returns the bearer token."""
    if method != "POST":
        raise Refused(
            problem(405, "method-not-allowed", "Use POST to report events.", {"Allow": "POST"})
        )
    if content_type != "application/json":
        raise Refused(
            problem(
                415,
                "unsupported-media-type",
                "Send events as application/json"
                + (
                    f", not '{content_type}'."
                    if content_type
                    else " (this request has no usable Content-Type)."
                ),
            )
        )
    if token is None:
        raise Refused(
            problem(
                401,
                "not-authenticated",
                "Send a service key: 'Authorization: Bearer sa_...'.",
                {"WWW-Authenticate": 'Bearer realm="sagaadmin"'},
            )
        )
    return token


UNKNOWN_KEY = problem(
    401,
    "not-authenticated",
    "The service key is unknown or revoked.",
    {"WWW-Authenticate": 'Bearer realm="sagaadmin", error="invalid_token"'},
)


def body_split(body: bytes) -> list[msgspec.Raw]:
    limit = settings.SAGAADMIN["INGEST_MAX_BODY_BYTES"]
    if len(body) > limit:  # the ASGI guard stops it earlier; this covers WSGI
        raise Refused(
            problem(413, "request-too-large", f"The body exceeds {limit} bytes.", limit_bytes=limit)
        )
    max_events = settings.SAGAADMIN["INGEST_MAX_EVENTS"]
    try:
        raws = split_body(body, max_events=max_events)
    except RequestMalformed as exc:
        raise Refused(problem(400, "malformed-request", str(exc))) from exc
    except TooManyEvents as exc:
        raise Refused(problem(413, "too-many-events", str(exc), max_events=max_events)) from exc
    if not raws:
        raise Refused(problem(400, "malformed-request", "'events' is empty."))
    return raws


def unavailable(exc: Exception) -> Reply:
    log.warning("ingest: database unavailable: %s", exc)
    return problem(
        503,
        "database-unavailable",
        "The event store is unavailable right now; nothing was stored. Retry later.",
        {"Retry-After": str(settings.SAGAADMIN["RETRY_AFTER_SECONDS"])},
    )


def result_reply(result: IngestResult) -> Reply:
    results = [r.as_dict() for r in result.results]
    if len(results) == 1 and result.results[0].status == REJECTED:
        errors = result.results[0].errors
        reply = problem(
            422,
            "event-rejected",
            "; ".join(f"{e.field}: {e.message}" for e in errors),
            errors=[{"field": e.field, "message": e.message} for e in errors],
            results=results,
        )
        return replace(reply, result=result)
    body = {
        "accepted": result.count(ACCEPTED),
        "duplicates": result.count(DUPLICATE),
        "rejected": result.count(REJECTED),
        "results": results,
    }
    return Reply(200, msgspec.json.encode(body), "application/json", result=result)


def http_response(reply: Reply) -> HttpResponse:
    response = HttpResponse(reply.body, status=reply.status, content_type=reply.content_type)
    for name, value in reply.headers.items():
        response[name] = value
    return response


@csrf_exempt
def events_view(request: HttpRequest) -> HttpResponse:
    started = time.perf_counter()
    reply = _events(request)
    metrics.ingest_observed(reply, time.perf_counter() - started)
    return http_response(reply)


def _events(request: HttpRequest) -> Reply:
    try:
        token = request_check(
            method=request.method or "",
            content_type=request.content_type or "",
            token=bearer_token(request),
        )
        key = service_key_authenticate(secret=token)
        if key is None:
            return UNKNOWN_KEY
        raws = body_split(request.body)
        with transaction.atomic(durable=True):
            result = events_ingest(service=key.service, raws=raws)
    except Refused as refused:
        return refused.reply
    except DB_UNAVAILABLE as exc:
        return unavailable(exc)
    return result_reply(result)
