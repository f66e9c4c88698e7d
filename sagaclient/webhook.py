"""Receiving Saga Admin's commands by webhook: verify the HMAC signature first.

Saga Admin signs each delivery (outbox/transports/webhook.py) with
``X-Sagaadmin-Timestamp`` and ``X-Sagaadmin-Signature: sha256=<hex>`` over
``"<timestamp>.<body>"`` with the subscription's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any


class InvalidSignature(ValueError):
    """The request was not signed with the secret, or too long ago."""


def signature_valid(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> bool:
    """True when ``body`` was signed with ``secret`` within ``tolerance`` seconds."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get("x-sagaadmin-timestamp", "")
    given = lower.get("x-sagaadmin-signature", "")
    if not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + digest.hexdigest(), given)


def command_verify(secret: str, headers: Mapping[str, str], body: bytes) -> Any:
    """The command message (decoded JSON) if the signature holds, else InvalidSignature.

    Deduplicate by ``command_id`` before acting: deliveries are at least once.
    """
    if not signature_valid(secret, headers, body):
        raise InvalidSignature("bad or stale X-Sagaadmin-Signature")
    return json.loads(body)
