"""Rollup compaction adds deltas into totals, in small and in COPY-sized batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tracking.models import SagaCount, SagaCountDelta, StepStat, StepStatDelta
from tracking.rollups import rollup_compact

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
