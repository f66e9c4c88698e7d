"""RFC 9457 problem details: every whole-request error of the API.

One constructor, :func:`problem_response`, is used by the ingest view, the DRF
exception handler and the ASGI body-limit guard, so every error has the same
shape: ``{"type", "title", "status", "detail", ...extensions}`` served as
``application/problem+json``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://sagaadmin.dev/problems/"

TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


def problem_body(status: int, slug: str, detail: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return body


def problem_bytes(status: int, slug: str, detail: str, **extra: Any) -> bytes:
    return msgspec.json.encode(problem_body(status, slug, detail, **extra))


def problem_response(
    status: int,
    slug: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> HttpResponse:
    response = HttpResponse(
        problem_bytes(status, slug, detail, **extra),
        status=status,
        content_type=PROBLEM_CONTENT_TYPE,
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


_SLUGS: dict[type[Exception], str] = {
    exceptions.ParseError: "malformed-request",
    exceptions.AuthenticationFailed: "not-authenticated",
    exceptions.NotAuthenticated: "not-authenticated",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not-found",
    exceptions.MethodNotAllowed: "method-not-allowed",
    exceptions.NotAcceptable: "not-acceptable",
    exceptions.UnsupportedMediaType: "unsupported-media-type",
    exceptions.Throttled: "rate-limited",
    exceptions.ValidationError: "invalid-parameters",
    Http404: "not-found",  # Django's, raised in a DRF view (DRF answers it as NotFound)
    DjangoPermissionDenied: "forbidden",
}


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Turn DRF's errors into problem+json, naming the offending fields."""
    response = exception_handler(exc, context)
    if response is None:
        return None
    slug = next((s for cls, s in _SLUGS.items() if isinstance(exc, cls)), "error")
    extra: dict[str, Any] = {}
    if isinstance(exc, exceptions.ValidationError):
        detail = "One or more parameters are invalid."
        extra["errors"] = _flatten_errors(response.data)
    else:
        detail = (
            str(response.data.get("detail", exc)) if isinstance(response.data, dict) else str(exc)
        )
        if isinstance(exc, exceptions.ParseError) and "int_max_str_digits" in detail:
            detail = "JSON parse error: a number in the body has more than 4300 digits."
    body = problem_body(response.status_code, slug, detail, **extra)
    response.data = body
    response.content_type = PROBLEM_CONTENT_TYPE
    return response


def _flatten_errors(data: Any, prefix: str = "") -> list[dict[str, str]]:
    if isinstance(data, dict):
        out: list[dict[str, str]] = []
        for key, value in data.items():
            out += _flatten_errors(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(data, list):
        return [e for item in data for e in _flatten_errors(item, prefix)]
    return [{"field": prefix or "request", "message": str(data)}]
