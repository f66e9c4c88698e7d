"""Refuse a request that carries a NUL character before any of it reaches the database.

PostgreSQL stores no NUL (U+0000) in a text value: a query that binds one fails with
a DataError, which would be a 500. A NUL can come in the path (a saga id), the query
string, a cookie, form fields or a JSON body; this middleware answers 400 instead,
naming where it was (problem+json under ``/api/``). Telemetry ingest bodies are left to
ingest's own check (``tracking.protocol``), which rejects only the event holding the NUL
and stores the others, on the ASGI fast path and through the Django views alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from sagaadmin.problems import problem_response
from tracking.api.fastpath import OTLP_PATHS, PATH
from tracking.protocol import nul_path

INGEST_PATHS = frozenset({PATH, *OTLP_PATHS})  # bodies checked per event by ingest

NUL = "\x00"


def _where(request: HttpRequest) -> str | None:
    if NUL in request.path:
        return "path"
    content_type = request.content_type or ""
    form = content_type in ("application/x-www-form-urlencoded", "multipart/form-data")
    pairs = [*request.GET.items(), *request.COOKIES.items()]
    if form:
        pairs += request.POST.items()
    for name, value in pairs:
        if NUL in name or NUL in str(value):
            return name.replace(NUL, "")
    if (
        content_type.endswith("json")
        and request.method not in ("GET", "HEAD")
        and request.path not in INGEST_PATHS
    ):
        body = request.body
        if b"\\u0000" in body:  # JSON writes NUL as \u0000: rare, then look
            try:
                return nul_path(json.loads(body))
            except ValueError:
                return None  # not JSON: the view says so
    return None


class NulGuardMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        where = _where(request)
        if where is None:
            return self.get_response(request)
        message = "contains a NUL character (\\u0000), which cannot be stored"
        if request.path.startswith("/api/"):
            return problem_response(
                400,
                "invalid-parameters",
                f"{where}: {message}.",
                errors=[{"field": where, "message": message}],
            )
        return HttpResponseBadRequest(f"{where}: {message}.", content_type="text/plain")
