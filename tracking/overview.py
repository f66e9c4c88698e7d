"""The overview page's numbers, read from the rollups (never a COUNT over sagas)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Max, Q, QuerySet, Sum

from tracking.models import (
    TERMINAL_SAGA_STATUSES,
    SagaCount,
    SagaCountDelta,
    SagaCountHour,
    SagaStatus,
    Service,
    StepStat,
    StepStatDay,
    StepStatDelta,
    split_delimited,
)
from tracking.rollups import (
    SAGA_BUCKET,
    SAGA_BUCKET_COARSE,
    STEP_BUCKET,
    STEP_BUCKET_COARSE,
    floor_time,
    percentile,
    rollup_compact,
)

WINDOWS = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
}
FAILED = {
    SagaStatus.FAILED,
    SagaStatus.COMPENSATED,
    SagaStatus.COMPENSATION_FAILED,
    SagaStatus.CANCELLED,
}
# Windows longer than this read the coarse rollups (hourly sagas, daily steps)
# and chart hourly points.
COARSE_AFTER = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class StepRow:
    saga_type: str
    step: str
    count: int
    failures: int
    p50_ms: float
    p95_ms: float

    @property
    def failure_rate(self) -> float:
        return self.failures / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True)
class Overview:
    window: str
    since: datetime
    statuses: dict[str, int]
    flags: dict[str, int]
    total: int
    series_t: list[int]  # bucket starts, unix seconds
    series_started: list[int]
    series_failed: list[int]
    series_failure_rate: list[float | None]
    slowest: list[StepRow]
    failing: list[StepRow]
    newest_event_at: datetime | None
    pending_deltas: int


def overview_get(*, window: str, now: datetime) -> Overview:
    rollup_compact()  # fold what ingest appended; cheap when little is pending
    since = floor_time(now - WINDOWS[window], SAGA_BUCKET)
    coarse = WINDOWS[window] > COARSE_AFTER
    point = SAGA_BUCKET_COARSE if coarse else SAGA_BUCKET
    # Two statements, each a UNION ALL over the sources (fine and coarse
    # buckets, pending deltas), summed by the database: Python sees one row
    # per (source, status, flags) and one per (source, bucket).
    statuses: Counter[str] = Counter()
    flags: Counter[str] = Counter()
    series: dict[datetime, Counter[str]] = defaultdict(Counter)
    sources = _tiers(
        SagaCount, SagaCountHour if coarse else None, SagaCountDelta, since, SAGA_BUCKET_COARSE
    )
    columns = ["delta" if qs.model is SagaCountDelta else "count" for qs in sources]
    totals = [
        qs.values_list("status", "flags").annotate(n=Sum(column))
        for qs, column in zip(sources, columns, strict=True)
    ]
    for status, flag_text, n in _union(totals):
        statuses[status] += n
        for flag in split_delimited(flag_text):
            flags[flag] += n
    per_bucket = [
        qs.values_list("bucket").annotate(
            started=Sum(column),
            failed=Sum(column, filter=Q(status__in=FAILED)),
            finished=Sum(column, filter=Q(status__in=TERMINAL_SAGA_STATUSES)),
        )
        for qs, column in zip(sources, columns, strict=True)
    ]
    for bucket, started_n, failed_n, finished_n in _union(per_bucket):
        counter = series[floor_time(_aware(bucket), point)]
        counter["started"] += started_n or 0
        counter["failed"] += failed_n or 0
        counter["finished"] += finished_n or 0
    buckets = _bucket_range(floor_time(since, point), now, point)
    started = [series[b]["started"] for b in buckets]
    failed = [series[b]["failed"] for b in buckets]
    finished = [series[b]["finished"] for b in buckets]
    steps = _step_rows(
        sources=_tiers(
            StepStat,
            StepStatDay if coarse else None,
            StepStatDelta,
            floor_time(now - WINDOWS[window], STEP_BUCKET),
            STEP_BUCKET_COARSE,
        )
    )
    newest = Service.objects.aggregate(newest=Max("last_event_at"))["newest"]
    return Overview(
        window=window,
        since=since,
        statuses={s: statuses.get(s, 0) for s in SagaStatus.values},
        flags=dict(sorted(flags.items())),
        total=sum(statuses.values()),
        series_t=[int(b.timestamp()) for b in buckets],
        series_started=started,
        series_failed=failed,
        series_failure_rate=[
            round(100 * f / d, 1) if d else None for f, d in zip(failed, finished, strict=True)
        ],
        slowest=sorted(steps, key=lambda r: -r.p95_ms)[:8],
        failing=sorted((r for r in steps if r.failures), key=lambda r: -r.failure_rate)[:8],
        newest_event_at=newest,
        pending_deltas=SagaCountDelta.objects.count(),
    )


def _union(querysets: list[QuerySet[Any]]) -> QuerySet[Any]:
    return querysets[0].union(*querysets[1:], all=True)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite in a UNION


def _bucket_range(since: datetime, now: datetime, size: timedelta) -> list[datetime]:
    out, at = [], since
    while at <= now:
        out.append(at)
        at += size
    return out


def _tiers(
    fine: type[Any], coarse: type[Any] | None, pending: type[Any], since: datetime, size: timedelta
) -> list[QuerySet[Any]]:
    """Querysets whose rows cover the buckets from ``since`` on, each exactly once.

    With a ``coarse`` table: the fine buckets before its first whole bucket,
    then the coarse buckets; always the ``pending`` deltas not compacted yet.
    """
    if coarse is None:
        tiers = [fine.objects.filter(bucket__gte=since)]
    else:
        edge = floor_time(since, size)
        edge = edge if edge == since else edge + size
        tiers = [
            fine.objects.filter(bucket__gte=since, bucket__lt=edge),
            coarse.objects.filter(bucket__gte=edge),
        ]
    return [qs.order_by() for qs in (*tiers, pending.objects.filter(bucket__gte=since))]


def _step_rows(*, sources: list[QuerySet[Any]]) -> list[StepRow]:
    bins: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    failures: Counter[tuple[str, str]] = Counter()
    grouped = [
        qs.values_list("saga_type", "step", "bin").annotate(n=Sum("count"), f=Sum("failures"))
        for qs in sources
    ]
    for saga_type, step, bin_, n, f in _union(grouped):
        bins[(saga_type, step)][bin_] += n
        failures[(saga_type, step)] += f
    out = []
    for key, histogram in bins.items():
        count = sum(histogram.values())
        if count <= 0:
            continue
        out.append(
            StepRow(
                key[0],
                key[1],
                count,
                failures[key],
                percentile(histogram, count, 0.50),
                percentile(histogram, count, 0.95),
            )
        )
    return out
