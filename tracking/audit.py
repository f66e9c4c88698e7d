"""Reading the audit log: filters, keyset pages, and CSV / JSON-lines exports.

The dashboard's audit page and ``GET /api/v1/audit`` both read through here.
Entries are written by :mod:`tracking.actions` only (append-only table).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import Q, QuerySet
from django.http import StreamingHttpResponse

from tracking.models import AuditEntry
from tracking.selectors import (
    MAX_PAGE,
    InvalidFilter,
    decode_cursor,
    encode_cursor,
    filter_time,
)

EXPORT_BATCH = 500
EXPORTS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl; charset=utf-8"}
AUDIT_COLUMNS = (
    "id",
    "at",
    "actor",
    "role",
    "action",
    "saga_id",
    "step",
    "reason",
    "outcome",
    "detail",
    "state_before",
    "state_after",
    "operator_action_id",
)
AUDIT_OUTCOMES = (
    "done",
    "dispatched",
    "awaiting_approval",
    "approved",
    "rejected",
    "forbidden",
    "conflict",
    "refused",
)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    actor: str = ""
    action: str = ""
    saga_id: str = ""
    outcome: str = ""
    since: datetime | None = None  # at >= since
    until: datetime | None = None  # at < until

    @classmethod
    def from_params(cls, params: Any) -> AuditFilter:
        """From query parameters; a bad time raises InvalidFilter naming it."""
        return cls(
            actor=(params.get("actor") or "").strip(),
            action=(params.get("action") or "").strip(),
            saga_id=(params.get("saga_id") or "").strip(),
            outcome=(params.get("outcome") or "").strip(),
            since=filter_time(params, "since"),
            until=filter_time(params, "until"),
        )


def audit_queryset(*, filters: AuditFilter) -> QuerySet[AuditEntry]:
    qs = AuditEntry.objects.all()
    for name in ("actor", "action", "saga_id", "outcome"):
        if value := getattr(filters, name):
            qs = qs.filter(**{name: value})
    if filters.since:
        qs = qs.filter(at__gte=filters.since)
    if filters.until:
        qs = qs.filter(at__lt=filters.until)
    return qs


def _after(qs: QuerySet[AuditEntry], at: datetime, pk: int) -> QuerySet[AuditEntry]:
    """Entries older than (at, pk) in the newest-first order."""
    return qs.filter(Q(at__lt=at) | Q(at=at, pk__lt=pk))


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[AuditEntry]
    next_cursor: str | None


def audit_list(*, filters: AuditFilter, cursor: str | None = None, limit: int = 50) -> AuditPage:
    """One keyset page, newest first: stable while entries are appended."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidFilter("limit", f"between 1 and {MAX_PAGE}")
    qs = audit_queryset(filters=filters)
    if cursor:
        qs = _after(qs, *decode_cursor(cursor))
    rows = list(qs.order_by("-at", "-pk")[: limit + 1])
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].at, rows[-1].pk)
    return AuditPage(rows, next_cursor)


def audit_export_batch(
    *, filters: AuditFilter, after: tuple[datetime, int] | None, size: int | None = None
) -> list[AuditEntry]:
    """The next batch of an export, newest first: the entries older than ``after``.

    Keyset batches hold no cursor open between them; entries appended while an
    export runs are newer than its first batch and are left out, none is read twice.
    """
    qs = audit_queryset(filters=filters).order_by("-at", "-pk")
    if after is not None:
        qs = _after(qs, *after)
    return list(qs[: size or EXPORT_BATCH])


def audit_row(entry: AuditEntry) -> dict[str, Any]:
    """One entry as the exports (and the API) show it."""
    return {
        "id": entry.pk,
        "at": entry.at.isoformat().replace("+00:00", "Z"),
        "actor": entry.actor,
        "role": entry.role,
        "action": entry.action,
        "saga_id": entry.saga_id,
        "step": entry.step,
        "reason": entry.reason,
        "outcome": entry.outcome,
        "detail": entry.detail,
        "state_before": entry.state_before,
        "state_after": entry.state_after,
        "operator_action_id": entry.operator_action_id,
    }


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell: JSON for the states; text a spreadsheet would run as a formula gets
    a leading ``'`` (OWASP CSV injection); numbers stay numbers."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv(rows: list[list[Any]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _encode(fmt: str, entries: list[AuditEntry]) -> str:
    rows = [audit_row(e) for e in entries]
    if fmt == "csv":
        return _csv([[_cell(row[c]) for c in AUDIT_COLUMNS] for row in rows])
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _connection_close() -> None:
    connection.close()


def audit_export(*, filters: AuditFilter, fmt: str, asgi: bool) -> StreamingHttpResponse:
    """Stream every matching entry as ``csv`` or ``jsonl``, newest first, in keyset batches.

    Under ASGI the batches come from an async iterator (database work in a
    thread), so the server sends them as they are read.
    """
    header = _csv([list(AUDIT_COLUMNS)]) if fmt == "csv" else ""

    def batch(after: tuple[datetime, int] | None) -> list[AuditEntry]:
        return audit_export_batch(filters=filters, after=after)

    def lines() -> Iterator[str]:
        if header:
            yield header
        after = None
        while entries := batch(after):
            yield _encode(fmt, entries)
            after = (entries[-1].at, entries[-1].pk)

    async def alines() -> AsyncIterator[str]:
        try:
            if header:
                yield header
            after = None
            while entries := await sync_to_async(batch)(after):
                yield await sync_to_async(_encode)(fmt, entries)
                after = (entries[-1].at, entries[-1].pk)
        except Exception:
            # The stream broke after its 200 went out, and Django sends no
            # request_finished for it: give the thread's pooled connection back here,
            # or every such export keeps one until the pool runs dry.
            await sync_to_async(_connection_close)()
            raise

    content: Iterator[str] | AsyncIterator[str] = alines() if asgi else lines()
    response = StreamingHttpResponse(content, content_type=EXPORTS[fmt])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="sagaadmin-audit-{stamp}.{fmt}"'
    response["Cache-Control"] = "no-store"
    return response
