"""The overview page's numbers, read from the rollups (never a COUNT over sagas)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Max, Q, Sum

from tracking.models import (
    TERMINAL_SAGA_STATUSES,
    SagaCount,
    SagaCountDelta,
    SagaStatus,
    Service,
    StepStat,
    StepStatDelta,
    split_delimited,
)
from tracking.rollups import SAGA_BUCKET, STEP_BUCKET, bin_upper_ms, floor_time, rollup_compact

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
    # Totals and the per-bucket series are summed by the database: Python only
    # sees one row per (status, flags) and one row per bucket.
    statuses: Counter[str] = Counter()
    flags: Counter[str] = Counter()
    series: dict[datetime, Counter[str]] = defaultdict(Counter)
    for model, column in ((SagaCount, "count"), (SagaCountDelta, "delta")):
        window_rows = model.objects.filter(bucket__gte=since).order_by()
        for status, flag_text, n in window_rows.values_list("status", "flags").annotate(
            n=Sum(column)
        ):
            statuses[status] += n
            for flag in split_delimited(flag_text):
                flags[flag] += n
        for bucket, started_n, failed_n, finished_n in window_rows.values_list("bucket").annotate(
            started=Sum(column),
            failed=Sum(column, filter=Q(status__in=FAILED)),
            finished=Sum(column, filter=Q(status__in=TERMINAL_SAGA_STATUSES)),
        ):
            counter = series[bucket]
            counter["started"] += started_n or 0
            counter["failed"] += failed_n or 0
            counter["finished"] += finished_n or 0
    buckets = _bucket_range(since, now, SAGA_BUCKET)
    started = [series[b]["started"] for b in buckets]
    failed = [series[b]["failed"] for b in buckets]
    finished = [series[b]["finished"] for b in buckets]
    steps = _step_rows(since=floor_time(now - WINDOWS[window], STEP_BUCKET))
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


def _bucket_range(since: datetime, now: datetime, size: timedelta) -> list[datetime]:
    out, at = [], since
    while at <= now:
        out.append(at)
        at += size
    return out


def _step_rows(*, since: datetime) -> list[StepRow]:
    bins: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    failures: Counter[tuple[str, str]] = Counter()
    for model in (StepStat, StepStatDelta):
        rows = (
            model.objects.filter(bucket__gte=since)
            .values_list("saga_type", "step", "bin")
            .annotate(n=Sum("count"), f=Sum("failures"))
        )
        for saga_type, step, bin_, n, f in rows:
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
                _percentile(histogram, count, 0.50),
                _percentile(histogram, count, 0.95),
            )
        )
    return out


def _percentile(histogram: Counter[int], count: int, q: float) -> float:
    rank, seen = q * count, 0
    for bin_ in sorted(histogram):
        seen += histogram[bin_]
        if seen >= rank:
            return round(bin_upper_ms(bin_), 1)
    return round(bin_upper_ms(max(histogram)), 1)
