"""Outbox housekeeping: retention of published messages, requeueing dead ones, lag."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Count, Min, Q
from django.utils import timezone

from outbox.models import OutboxMessage, Status


def published_delete(*, older_than: timedelta, batch_size: int = 5000) -> int:
    """Delete published messages older than ``older_than``, in batches (short transactions).

    Dead messages are kept until an operator requeues or deletes them.
    """
    cutoff = timezone.now() - older_than
    deleted = 0
    while True:
        with transaction.atomic():
            seqs = list(
                OutboxMessage.objects.filter(status=Status.PUBLISHED, published_at__lt=cutoff)
                .order_by("seq")
                .values_list("seq", flat=True)[:batch_size]
            )
            if not seqs:
                return deleted
            deleted += OutboxMessage.objects.filter(seq__in=seqs).delete()[0]


def dead_requeue(*, message_ids: list[str] | None = None, **filters: Any) -> int:
    """Put dead messages back in line (attempts from zero, due now); returns how many.

    Select by ``message_ids`` and/or model filters (``aggregatetype=...``,
    ``type=...``); with neither, nothing is requeued (say ``all_dead=True``).
    """
    everything = filters.pop("all_dead", False)
    if not message_ids and not filters and not everything:
        return 0
    query = OutboxMessage.objects.filter(status=Status.DEAD, **filters)
    if message_ids:
        query = query.filter(message_id__in=message_ids)
    return query.update(
        status=Status.PENDING, attempts=0, available_at=timezone.now(), published_at=None
    )


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    published: int
    dead: int
    oldest_pending_at: datetime | None

    def lag(self, now: datetime) -> timedelta | None:
        """Age of the oldest pending message (how far the relay is behind)."""
        return None if self.oldest_pending_at is None else now - self.oldest_pending_at


def outbox_stats() -> OutboxStats:
    row = OutboxMessage.objects.aggregate(
        pending=Count("seq", filter=Q(status=Status.PENDING)),
        published=Count("seq", filter=Q(status=Status.PUBLISHED)),
        dead=Count("seq", filter=Q(status=Status.DEAD)),
        oldest=Min("created_at", filter=Q(status=Status.PENDING)),
    )
    return OutboxStats(row["pending"], row["published"], row["dead"], row["oldest"])
