"""Authentication for the API: people by session, services by bearer key.

A service key can only report telemetry: the read API answers 403 to it.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest
from rest_framework import authentication, exceptions, permissions

from tracking.keys import service_key_authenticate
from tracking.models import ServiceKey


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
    """A logged-in person. Service keys are for reporting only."""

    message = "This endpoint is for people; a service key can only report telemetry."

    def has_permission(self, request: Any, view: Any) -> bool:
        if isinstance(request.auth, ServiceKey):
            return False
        return bool(request.user and request.user.is_authenticated)
