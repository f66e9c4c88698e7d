"""``publish()``: the one way anything in Saga Admin sends a message."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec
from django.db import connection
from django.utils import timezone

from outbox.models import OutboxMessage
from sagaadmin.db import server_side
from sagaadmin.telemetry import headers_with_context

NOTIFY_CHANNEL = "sagaadmin_outbox"
# The writers' per-key lock (one bigint key; the relay uses the two-int key
# space), the NOTIFY, then the row: the CTE runs before the row (and its seq).
PUBLISH_SQL = """
WITH turn AS (SELECT pg_advisory_xact_lock(hashtextextended(%s, 0)), pg_notify(%s, ''))
INSERT INTO outbox_outboxmessage
    (id, aggregatetype, aggregateid, type, version, payload, headers, created_at,
     available_at, attempts, last_error, status)
SELECT %s, %s, %s, %s, %s, %s, %s::jsonb, now(), %s, 0, '', 'pending' FROM turn
RETURNING seq, created_at
"""


class OutsideTransaction(RuntimeError):
    """publish() was called outside ``transaction.atomic()``."""


def encode_payload(payload: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8; the same value gives the same text."""
    try:
        return msgspec.json.encode(payload, order="sorted").decode()
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValueError(f"payload: not JSON-serialisable ({exc})") from exc


def publish(
    *,
    topic: str,
    key: str,
    type: str,
    payload: Any,
    version: int = 1,
    headers: Mapping[str, str] | None = None,
    available_at: datetime | None = None,
) -> OutboxMessage:
    """Queue a message in the caller's transaction; the relay sends it after commit.

    ``topic``: where it goes (the RabbitMQ exchange, the stream, the subject);
    ``key``: the ordering key (an aggregate id): messages of one key are
    published in the order their transactions commit; on PostgreSQL the
    transaction holds the key's lock from here to its end, so publish last and
    commit soon, and take several keys in one order (sorted) to avoid
    deadlocks. Raises :class:`OutsideTransaction` outside
    ``transaction.atomic()`` — a message written on its own could be sent for a
    change that then rolls back, or be lost for one that commits.
    """
    if not connection.in_atomic_block:
        raise OutsideTransaction(
            "outbox.publish() must run inside transaction.atomic(), together with the "
            "change the message announces"
        )
    for name, value in (("topic", topic), ("key", key), ("type", type)):
        if not isinstance(value, str) or not value or len(value) > 200:
            raise ValueError(f"{name}: a non-empty string of at most 200 characters")
    if not isinstance(version, int) or version < 1:
        raise ValueError("version: an integer >= 1")
    # the current trace travels with the message (W3C traceparent), unless it names its own
    clean_headers = headers_with_context({str(k): str(v) for k, v in (headers or {}).items()})
    message = OutboxMessage(
        aggregatetype=topic,
        aggregateid=key,
        type=type,
        version=version,
        payload=encode_payload(payload),
        headers=clean_headers,
        available_at=available_at or timezone.now(),
    )
    if connection.vendor == "postgresql":
        # One round trip: per-key commit order — publishers of one key take turns
        # from here to their commit, so the key's sequence numbers are taken in
        # commit order (docs/outbox.md, "Per-key order"; released when the
        # transaction ends) — the relay's wake-up (NOTIFY, delivered at commit,
        # once per transaction, not at all on rollback) and the row itself.
        # Server-side binding: the parameters travel apart from the SQL text and the
        # statement gets prepared once it repeats (Django's own cursors bind on the
        # client, so PostgreSQL would parse and plan it again for every message).
        [(message.seq, message.created_at)] = server_side(
            PUBLISH_SQL,
            [
                f"{topic}/{key}",
                NOTIFY_CHANNEL,
                message.message_id,
                topic,
                key,
                type,
                version,
                message.payload,
                encode_payload(clean_headers),
                message.available_at,
            ],
            returns=True,
        )
        message._state.adding = False
        message._state.db = connection.alias
    else:
        message.save(force_insert=True)
    return message
