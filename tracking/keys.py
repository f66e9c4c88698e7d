"""Service keys: created once (the secret shown once), stored hashed, revocable.

A key reads ``sa_<prefix>_<secret>``. The prefix finds the row; the SHA-256 of
the whole key is compared in constant time. Keys carry 256 bits of randomness,
so a fast hash is enough (docs/decisions/0004-service-key-hashing.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from tracking.models import Service, ServiceKey

KEY_PREFIX = "sa_"
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ServiceKey
    secret: str  # the full key; not stored anywhere


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def service_get_or_create(*, name: str) -> Service:
    service, _ = Service.objects.get_or_create(name=name)
    return service


def service_key_create(*, service_name: str, name: str = "") -> CreatedKey:
    with transaction.atomic():
        service = service_get_or_create(name=service_name)
        prefix = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        key = ServiceKey.objects.create(
            service=service, name=name, prefix=prefix, hashed=_hash(secret)
        )
    return CreatedKey(key=key, secret=secret)


def service_key_revoke(*, prefix: str) -> ServiceKey:
    """Revoke the key with this prefix (idempotent). Raises ServiceKey.DoesNotExist."""
    key = ServiceKey.objects.get(prefix=prefix.removeprefix(KEY_PREFIX).split("_")[0])
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def service_key_authenticate(*, secret: str) -> ServiceKey | None:
    """The active key matching ``secret``, or None. Touches last_used_at (coarsely)."""
    if not secret.startswith(KEY_PREFIX):
        return None
    prefix = secret[len(KEY_PREFIX) :].split("_", 1)[0]
    key = ServiceKey.objects.select_related("service").filter(prefix=prefix).first()
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.hashed, _hash(secret)):
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ServiceKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key
