"""Reads of the tracking read model and event store (no writes here)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection
from django.db.models import Count, Prefetch, Q, QuerySet
from django.utils.dateparse import parse_datetime

from tracking.models import (
    Incident,
    IncidentKind,
    IncidentStatus,
    Saga,
    SagaStatus,
    Step,
    TelemetryEvent,
)
from tracking.projection import FoldEvent, order_events

SORTS = {
    "-started_at": ("started_at", True),
    "started_at": ("started_at", False),
    "-last_event_at": ("last_event_at", True),
    "last_event_at": ("last_event_at", False),
}
MAX_PAGE = 200


class InvalidFilter(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# what ``flag`` filters on: the projection's own flags and the kinds of open incidents
SAGA_FLAGS = ("anomaly", "clock_skew")
INCIDENT_FLAGS = tuple(k for k in IncidentKind.values if k not in SAGA_FLAGS)
FILTER_FLAGS = SAGA_FLAGS + INCIDENT_FLAGS


@dataclass(frozen=True, slots=True)
class SagaFilter:
    saga_type: str = ""
    statuses: tuple[str, ...] = ()
    service: str = ""
    step: str = ""
    flag: str = ""
    saga_id_prefix: str = ""
    started_after: datetime | None = None
    started_before: datetime | None = None
    attributes: tuple[tuple[str, str], ...] = ()

    # the filter's own parameters (``attr.<key>`` besides)
    PARAMS = frozenset(
        ("type", "status", "service", "step", "flag", "saga_id", "started_after", "started_before")
    )

    @classmethod
    def strict(cls, params: Any) -> SagaFilter:
        """:meth:`from_params` that also refuses a parameter it does not know: where a
        misspelt filter would widen what an action touches (bulk actions)."""
        for name in params:
            if name not in cls.PARAMS and not name.startswith("attr."):
                raise InvalidFilter(
                    name,
                    "not a filter; filters are " + ", ".join(sorted(cls.PARAMS)) + ", attr.<key>",
                )
        return cls.from_params(params)

    @classmethod
    def from_params(cls, params: Any) -> SagaFilter:
        """Build from query parameters, naming the parameter that is wrong (a NUL
        character never gets here: sagaadmin.nul_guard refuses the request)."""
        statuses = tuple(s for s in params.get("status", "").split(",") if s)
        for status in statuses:
            if status not in SagaStatus.values:
                raise InvalidFilter(
                    "status", f"unknown status '{status}'; one of {', '.join(SagaStatus.values)}"
                )
        flag = params.get("flag", "")
        if flag and flag not in FILTER_FLAGS:
            raise InvalidFilter("flag", f"unknown flag '{flag}'; one of {', '.join(FILTER_FLAGS)}")
        attrs = tuple(
            (name[5:], params.get(name)) for name in sorted(params) if name.startswith("attr.")
        )
        for key, _ in attrs:
            if not key or not key.replace("_", "").replace("-", "").isalnum():
                raise InvalidFilter(f"attr.{key}", "attribute keys are letters, digits, _ and -")
        return cls(
            saga_type=params.get("type", ""),
            statuses=statuses,
            service=params.get("service", ""),
            step=params.get("step", ""),
            flag=flag,
            saga_id_prefix=params.get("saga_id", ""),
            started_after=filter_time(params, "started_after"),
            started_before=filter_time(params, "started_before"),
            attributes=attrs,
        )


def filter_time(params: Any, name: str) -> datetime | None:
    """An RFC 3339 time with offset from query parameters, or :class:`InvalidFilter`
    naming it. Sentinels like ``9999-12-31T23:59:59Z`` are fine; a time whose offset
    takes it past datetime's range in UTC is refused."""
    raw = params.get(name)
    if not raw:
        return None
    try:
        value = parse_datetime(raw)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise InvalidFilter(
            name, "expected an RFC 3339 time with offset, e.g. 2026-01-01T00:00:00Z"
        )
    if (utc := _utc(value)) is None:
        raise InvalidFilter(name, "lies outside the range of times (years 1 to 9999 in UTC)")
    return utc


def _utc(value: datetime) -> datetime | None:
    """``value`` in UTC (PostgreSQL refuses offsets past ±15:59, which RFC 3339 allows),
    or None when its offset takes it past datetime's range."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return None


def saga_queryset(*, filters: SagaFilter) -> QuerySet[Saga]:
    qs = Saga.objects.filter(event_count__gt=0)
    if filters.saga_type:
        qs = qs.filter(saga_type=filters.saga_type)
    if filters.statuses:
        qs = qs.filter(status__in=filters.statuses)
    if filters.service:
        qs = qs.filter(services__contains=f",{filters.service},")
    if filters.flag in IncidentKind.values and filters.flag != IncidentKind.ANOMALY:
        # an open incident's kind: the detector mirrors them in open_incidents
        qs = qs.filter(open_incidents__contains=f",{filters.flag},").exclude(open_incidents="")
    elif filters.flag:
        # "flags <> ''" lets PostgreSQL walk the small partial index of flagged sagas.
        qs = qs.filter(flags__contains=f",{filters.flag},").exclude(flags="")
    if filters.step:
        qs = qs.filter(steps__name=filters.step)
    if filters.saga_id_prefix:
        qs = qs.filter(saga_id__startswith=filters.saga_id_prefix)
    if filters.started_after:
        qs = qs.filter(started_at__gte=filters.started_after)
    if filters.started_before:
        qs = qs.filter(started_at__lt=filters.started_before)
    for key, value in filters.attributes:
        if connection.vendor == "postgresql":  # GIN-indexed containment
            qs = qs.filter(attributes__contains={key: _scalar(value)})
        else:
            qs = qs.filter(**{f"attributes__{key}": _scalar(value)})
    return qs


def _scalar(value: str) -> str | int | float | bool:
    """Query strings are text; match numbers and booleans as the reporter sent them."""
    if value in ("true", "false"):
        return value == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@dataclass(frozen=True, slots=True)
class SagaPage:
    sagas: list[Saga]
    next_cursor: str | None


def encode_cursor(value: datetime, pk: int) -> str:
    raw = json.dumps([value.isoformat(), pk]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value, pk = json.loads(raw)
        when = parse_datetime(value)
        if when is None or when.tzinfo is None or _utc(when) is None or not isinstance(pk, int):
            raise ValueError
        return when, pk
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise InvalidFilter("cursor", "not a cursor this API handed out") from exc


def saga_list(
    *,
    filters: SagaFilter,
    sort: str = "-started_at",
    cursor: str | None = None,
    limit: int = 50,
    fields: Sequence[str] = (),
) -> SagaPage:
    """One keyset page: stable under inserts (a new saga never shifts a page).

    ``fields``: load only these columns (the dashboard's rows need a few).
    """
    if sort not in SORTS:
        raise InvalidFilter("sort", f"one of {', '.join(SORTS)}")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidFilter("limit", f"between 1 and {MAX_PAGE}")
    column, descending = SORTS[sort]
    qs = saga_queryset(filters=filters).filter(**{f"{column}__isnull": False})
    if cursor:
        value, pk = decode_cursor(cursor)
        op = "<" if descending else ">"
        table = connection.ops.quote_name(Saga._meta.db_table)
        qs = qs.extra(  # noqa: S610 - row-value comparison keeps the keyset index usable
            where=[f"({table}.{column}, {table}.id) {op} (%s, %s)"],
            params=[connection.ops.adapt_datetimefield_value(value), pk],
        )
    order = [f"-{column}", "-id"] if descending else [column, "id"]
    if fields:
        qs = qs.only(*fields)
    rows = list(qs.order_by(*order)[: limit + 1])
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(getattr(last, column), last.pk)
    return SagaPage(rows, next_cursor)


def saga_get(*, saga_id: str) -> Saga | None:
    return (
        Saga.objects.filter(saga_id=saga_id, event_count__gt=0)
        .prefetch_related(Prefetch("steps", queryset=Step.objects.order_by("position")))
        .first()
    )


@dataclass(frozen=True, slots=True)
class EventRow:
    """A stored event as pages and the API show it (cheaper than a model instance)."""

    service_name: str
    event_id: str
    protocol_version: int
    saga_id: str
    saga_type: str
    type: str
    step: str
    attempt: int
    occurred_at: datetime
    received_at: datetime
    sequence: int | None
    deadline: datetime | None
    idempotency_key: str
    message: Any
    error: Any
    attributes: Any
    payload: Any
    trace_id: str
    span_id: str


_EVENT_COLUMNS = ("service__name", *(f for f in EventRow.__slots__ if f != "service_name"))


def saga_events_list(*, saga_id: str) -> list[EventRow]:
    """The saga's events in timeline order (the projection's order)."""
    rows = [
        EventRow(*values)
        for values in TelemetryEvent.objects.filter(saga_id=saga_id)
        .order_by()
        .values_list(*_EVENT_COLUMNS)
    ]
    by_key = {(e.service_name, e.event_id): e for e in rows}
    keys = [
        FoldEvent(
            service=e.service_name,
            event_id=e.event_id,
            type=e.type,
            occurred_at=e.occurred_at,
            received_at=e.received_at,
            sequence=e.sequence,
        )
        for e in rows
    ]
    return [by_key[(k.service, k.event_id)] for k in order_events(keys)]


INCIDENT_STATES = ("unresolved", *IncidentStatus.values, "all")


@dataclass(frozen=True, slots=True)
class IncidentPage:
    incidents: list[Incident]
    next_cursor: str | None


def incident_list(
    *,
    state: str = "unresolved",
    kind: str = "",
    saga_type: str = "",
    saga_id: str = "",
    cursor: str | None = None,
    limit: int = 50,
) -> IncidentPage:
    """Incidents, newest first, one keyset page. ``state``: unresolved (open or acknowledged),
    open, acknowledged, resolved or all."""
    if state not in INCIDENT_STATES:
        raise InvalidFilter("state", f"one of {', '.join(INCIDENT_STATES)}")
    if kind and kind not in IncidentKind.values:
        raise InvalidFilter("kind", f"one of {', '.join(IncidentKind.values)}")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidFilter("limit", f"between 1 and {MAX_PAGE}")
    qs = Incident.objects.select_related("saga")
    if state == "unresolved":
        qs = qs.filter(resolved_at__isnull=True)
    elif state != "all":
        qs = qs.filter(status=state)
    if kind:
        qs = qs.filter(kind=kind)
    if saga_type:
        qs = qs.filter(saga_type=saga_type)
    if saga_id:
        qs = qs.filter(saga__saga_id=saga_id)
    if cursor:
        value, pk = decode_cursor(cursor)
        qs = qs.filter(Q(opened_at__lt=value) | Q(opened_at=value, pk__lt=pk))
    rows = list(qs.order_by("-opened_at", "-id")[: limit + 1])
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].opened_at, rows[-1].pk)
    return IncidentPage(rows, next_cursor)


def incident_counts() -> dict[str, int]:
    """Unresolved incidents by kind (every kind present, zero when none)."""
    counts = dict(
        Incident.objects.filter(resolved_at__isnull=True)
        .order_by()
        .values_list("kind")
        .annotate(n=Count("id"))
    )
    return {kind: counts.get(kind, 0) for kind in IncidentKind.values}
