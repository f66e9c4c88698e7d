"""Rollup compaction adds deltas into totals (fine and coarse); the overview reads them exactly."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import patch

import pytest

from tracking.models import (
    SagaCount,
    SagaCountDelta,
    SagaCountHour,
    StepStat,
    StepStatDay,
    StepStatDelta,
)
from tracking.overview import WINDOWS, overview_get
from tracking.rollups import SAGA_BUCKET, STEP_BUCKET, floor_time, rollup_compact

T0 = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize("keys", [3, 150])  # below and above the COPY threshold
def test_compaction_adds_up_across_runs(db, keys) -> None:
    for run in range(2):
        SagaCountDelta.objects.bulk_create(
            SagaCountDelta(
                bucket=T0 + timedelta(minutes=5 * k),
                saga_type="order",
                status="running",
                flags="",
                delta=k + run,
            )
            for k in range(keys)
        )
        StepStatDelta.objects.bulk_create(
            StepStatDelta(
                bucket=T0 + timedelta(hours=k),
                saga_type="order",
                step="charge",
                bin=3,
                count=2,
                failures=run,
            )
            for k in range(keys)
        )
        assert rollup_compact() is True
    assert SagaCountDelta.objects.count() == 0
    counts = dict(SagaCount.objects.values_list("bucket", "count"))
    assert counts == {T0 + timedelta(minutes=5 * k): 2 * k + 1 for k in range(keys)}
    assert set(StepStat.objects.values_list("count", "failures")) == {(4, 1)}
    assert StepStat.objects.count() == keys


def _spread_deltas(now: datetime, rng: random.Random, n: int) -> None:
    """Saga and step deltas at random times over the last 8 days (edges included)."""
    statuses = ["running", "completed", "compensated", "failed"]
    SagaCountDelta.objects.bulk_create(
        SagaCountDelta(
            bucket=floor_time(now - timedelta(minutes=rng.randrange(8 * 24 * 60)), SAGA_BUCKET),
            saga_type=rng.choice(["order", "refund"]),
            status=rng.choice(statuses),
            flags=rng.choice(["", ",stuck,"]),
            delta=rng.randrange(1, 4),
        )
        for _ in range(n)
    )
    StepStatDelta.objects.bulk_create(
        StepStatDelta(
            bucket=floor_time(now - timedelta(minutes=rng.randrange(8 * 24 * 60)), STEP_BUCKET),
            saga_type="order",
            step=rng.choice(["charge", "ship"]),
            bin=rng.randrange(10, 20),
            count=2,
            failures=rng.randrange(0, 3),
        )
        for _ in range(n)
    )


def test_the_coarse_tables_hold_the_fine_totals_by_hour_and_day(db) -> None:
    now = datetime(2026, 11, 26, 13, 37, 12, tzinfo=UTC)
    rng = random.Random(7)
    for _ in range(2):  # two compactions add up in the coarse tables too
        _spread_deltas(now, rng, 400)
        assert rollup_compact() is True
    by_hour: Counter[tuple[Any, ...]] = Counter()
    for bucket, t, s, f, n in SagaCount.objects.values_list(
        "bucket", "saga_type", "status", "flags", "count"
    ):
        by_hour[(floor_time(bucket, timedelta(hours=1)), t, s, f)] += n
    hours = {
        (b, t, s, f): n
        for b, t, s, f, n in SagaCountHour.objects.values_list(
            "bucket", "saga_type", "status", "flags", "count"
        )
    }
    assert hours == {k: n for k, n in by_hour.items() if n}
    by_day: Counter[tuple[Any, ...]] = Counter()
    for bucket, t, step, b, n, fails in StepStat.objects.values_list(
        "bucket", "saga_type", "step", "bin", "count", "failures"
    ):
        by_day[(floor_time(bucket, timedelta(days=1)), t, step, b, "n")] += n
        by_day[(floor_time(bucket, timedelta(days=1)), t, step, b, "f")] += fails
    days: Counter[tuple[Any, ...]] = Counter()
    for bucket, t, step, b, n, fails in StepStatDay.objects.values_list(
        "bucket", "saga_type", "step", "bin", "count", "failures"
    ):
        days[(bucket, t, step, b, "n")] += n
        days[(bucket, t, step, b, "f")] += fails
    assert days == by_day


@pytest.mark.parametrize("window", ["24h", "7d"])
def test_the_overview_reads_each_bucket_of_its_window_exactly_once(db, window) -> None:
    """Long windows read hourly/daily tables plus the finer edge: same numbers as the fine rows."""
    now = datetime(2026, 11, 26, 13, 37, 12, tzinfo=UTC)
    rng = random.Random(11)
    _spread_deltas(now, rng, 600)
    rollup_compact()
    _spread_deltas(now, rng, 50)  # left pending: read from the delta tables
    since = floor_time(now - WINDOWS[window], SAGA_BUCKET)
    fine = [
        (b, s, n)
        for b, s, n in SagaCount.objects.values_list("bucket", "status", "count")
        if b >= since
    ] + [
        (b, s, n)
        for b, s, n in SagaCountDelta.objects.values_list("bucket", "status", "delta")
        if b >= since
    ]
    with patch("tracking.overview.rollup_compact"):  # keep the pending deltas pending
        overview = overview_get(window=window, now=now)
    statuses: Counter[str] = Counter()
    for _, status, n in fine:
        statuses[status] += n
    assert {s: n for s, n in overview.statuses.items() if n} == dict(statuses)
    point = timedelta(hours=1) if window == "7d" else SAGA_BUCKET
    started: Counter[int] = Counter()
    for bucket, _, n in fine:
        started[int(floor_time(bucket, point).timestamp())] += n
    assert dict(zip(overview.series_t, overview.series_started, strict=True)) == {
        t: started.get(t, 0) for t in overview.series_t
    }
    assert sum(overview.series_started) == sum(statuses.values())
    step_since = floor_time(now - WINDOWS[window], STEP_BUCKET)
    step_counts: Counter[str] = Counter()
    for model in (StepStat, StepStatDelta):
        for bucket, step, n in model.objects.values_list("bucket", "step", "count"):
            if bucket >= step_since:
                step_counts[step] += n
    shown = {r.step: r.count for r in overview.slowest}
    assert shown == dict(step_counts)
