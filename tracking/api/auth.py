"""Authentication for the API: people by session, services by bearer key.

A service key can only report telemetry: the read API answers 403 to it.
Acting on incidents needs the operator (or admin) role, editing saga-type
thresholds the admin role (tracking/roles.py); list them after
:class:`IsPerson`, so a service key or a stranger gets its answer first.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from tracking.keys import service_key_authenticate
from tracking.models import ServiceKey
from tracking.roles import can_act, can_edit_thresholds, can_view


def bearer_token(request: HttpRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ServiceKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer sa_...``; the request's auth is the ServiceKey."""

    def authenticate(self, request: Any) -> tuple[Any, ServiceKey] | None:
        token = bearer_token(request)
        if token is None:
            return None
        key = service_key_authenticate(secret=token)
        if key is None:
            raise exceptions.AuthenticationFailed("The service key is unknown or revoked.")
        return AnonymousUser(), key

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="sagaadmin"'


class IsPerson(permissions.BasePermission):
    """A logged-in person with a role (viewer or more), as the dashboard asks.

    Service keys are for reporting only.
    """

    message = (
        "This endpoint is for people with a role (viewer, operator, admin); "
        "a service key can only report telemetry."
    )

    def has_permission(self, request: Any, view: Any) -> bool:
        if isinstance(request.auth, ServiceKey):
            return False
        return can_view(request.user)


class CanAct(permissions.BasePermission):
    """Operators and admins: acknowledging and resolving incidents."""

    message = "Only operators and admins can acknowledge or resolve incidents."

    def has_permission(self, request: Any, view: Any) -> bool:
        return can_act(request.user)


class CanEditThresholdsOrReadOnly(permissions.BasePermission):
    """Anyone allowed in may read; only admins change saga-type thresholds."""

    message = "Only admins can change saga-type thresholds."

    def has_permission(self, request: Any, view: Any) -> bool:
        return request.method in permissions.SAFE_METHODS or can_edit_thresholds(request.user)


class ServiceKeyScheme(OpenApiAuthenticationExtension):
    """The schema's description of service keys.

    They are accepted only by ``POST /api/v1/events`` (a plain Django view,
    outside this schema), so no operation of the schema lists one.
    """

    target_class = ServiceKeyAuthentication
    name = "serviceKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A service key (sa_...): reports telemetry only; "
            "every endpoint listed here answers 403 to it.",
        }

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return []
