"""The idempotent inbox: apply a delivered message at most once per consumer.

Delivery is at least once (relay crashes, broker redeliveries), so a consumer
records ``(consumer, message id)`` in the transaction that applies the
message. A redelivery finds the record and is acknowledged without effect.
Acknowledge the broker only after :func:`inbox_apply` returned (after commit):
a crash in between redelivers, and the record makes that harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from outbox import versions
from outbox.models import InboxMessage


@dataclass(frozen=True, slots=True)
class Incoming:
    """A delivered message, its payload already upcast to the current version."""

    id: str
    topic: str
    key: str
    type: str
    version: int
    payload: Any
    headers: dict[str, Any] = field(default_factory=dict)


def incoming(
    *, id: str, topic: str, key: str, type: str, version: int, payload: Any, headers: Any = None
) -> Incoming:
    """Build an :class:`Incoming`, upcasting ``payload`` (``UnknownVersion`` if it cannot be)."""
    if isinstance(payload, dict):
        version, payload = versions.upcast(type, version, payload)
    else:
        versions.check(type, version)
    return Incoming(id, topic, key, type, version, payload, dict(headers or {}))


def inbox_apply(consumer: str, message: Incoming, handler: Callable[[Incoming], None]) -> bool:
    """Run ``handler`` for ``message`` unless ``consumer`` applied it before; True if it ran.

    One transaction: the inbox record and the handler's writes commit together.
    """
    with transaction.atomic():
        if not _record(consumer, message.id):
            return False  # applied before (or by a concurrent delivery that committed)
        handler(message)
    return True


def _record(consumer: str, message_id: str) -> bool:
    """Insert the inbox row; False when it exists. One statement on PostgreSQL and SQLite.

    A concurrent transaction inserting the same row makes this one wait for it,
    then find the conflict: the message is applied by exactly one of them.
    """
    table = connection.ops.quote_name(InboxMessage._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (consumer, message_id, received_at) "  # noqa: S608
            "VALUES (%s, %s, %s) ON CONFLICT (consumer, message_id) DO NOTHING RETURNING id",
            [consumer, message_id, timezone.now()],
        )
        return cursor.fetchone() is not None
