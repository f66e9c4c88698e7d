"""``POST /api/v1/events``: the telemetry endpoint.

A plain Django view rather than a DRF one: it is the hot path, and its
contract (per-event results, problem+json for whole-request errors) is its own.
"""

from __future__ import annotations

import logging

import msgspec
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from sagaadmin.problems import problem_response
from tracking.api.auth import bearer_token
from tracking.ingest import ACCEPTED, DUPLICATE, REJECTED, events_ingest
from tracking.keys import service_key_authenticate
from tracking.protocol import RequestMalformed, TooManyEvents, split_body

log = logging.getLogger(__name__)


def _unavailable(exc: Exception) -> HttpResponse:
    log.warning("ingest: database unavailable: %s", exc)
    retry = str(settings.SAGAADMIN["RETRY_AFTER_SECONDS"])
    return problem_response(
        503,
        "database-unavailable",
        "The event store is unavailable right now; nothing was stored. Retry later.",
        headers={"Retry-After": retry},
    )


@csrf_exempt
def events_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return problem_response(
            405, "method-not-allowed", "Use POST to report events.", headers={"Allow": "POST"}
        )
    content_type = request.content_type or ""
    if content_type != "application/json":
        return problem_response(
            415,
            "unsupported-media-type",
            f"Send events as application/json, not '{content_type or 'no content type'}'.",
        )
    token = bearer_token(request)
    if token is None:
        return problem_response(
            401,
            "not-authenticated",
            "Send a service key: 'Authorization: Bearer sa_...'.",
            headers={"WWW-Authenticate": 'Bearer realm="sagaadmin"'},
        )
    limit = settings.SAGAADMIN["INGEST_MAX_BODY_BYTES"]
    try:
        key = service_key_authenticate(secret=token)
        if key is None:
            return problem_response(
                401,
                "not-authenticated",
                "The service key is unknown or revoked.",
                headers={"WWW-Authenticate": 'Bearer realm="sagaadmin", error="invalid_token"'},
            )
        body = request.body
        if len(body) > limit:  # the ASGI guard stops it earlier; this covers WSGI
            return problem_response(
                413, "request-too-large", f"The body exceeds {limit} bytes.", limit_bytes=limit
            )
        raws = split_body(body, max_events=settings.SAGAADMIN["INGEST_MAX_EVENTS"])
        if not raws:
            return problem_response(400, "malformed-request", "'events' is empty.")
        with transaction.atomic(durable=True):
            result = events_ingest(service=key.service, raws=raws)
    except RequestMalformed as exc:
        return problem_response(400, "malformed-request", str(exc))
    except TooManyEvents as exc:
        return problem_response(
            413,
            "too-many-events",
            str(exc),
            max_events=settings.SAGAADMIN["INGEST_MAX_EVENTS"],
        )
    except (OperationalError, InterfaceError) as exc:  # connection refused, lost or timed out
        return _unavailable(exc)
    body_out = {
        "accepted": result.count(ACCEPTED),
        "duplicates": result.count(DUPLICATE),
        "rejected": result.count(REJECTED),
        "results": [r.as_dict() for r in result.results],
    }
    if len(raws) == 1 and result.results[0].status == REJECTED:
        first = result.results[0]
        return problem_response(
            422,
            "event-rejected",
            "; ".join(f"{e.field}: {e.message}" for e in first.errors),
            errors=[{"field": e.field, "message": e.message} for e in first.errors],
            results=body_out["results"],
        )
    return HttpResponse(msgspec.json.encode(body_out), content_type="application/json")
