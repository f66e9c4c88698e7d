"""Incrementally maintained rollups behind the overview page.

Counting sagas per request (``COUNT(*)`` over the read model) does not scale,
and a counter row updated by every ingest transaction would serialise them
all. So ingest *appends* delta rows (``SagaCountDelta``, ``StepStatDelta``):
the difference between a saga's contribution before and after its re-fold.
:func:`rollup_compact` folds committed deltas into the totals
(``SagaCount``, ``StepStat``); readers add the few deltas not compacted yet.

Contributions:
- a saga counts once in (5-minute bucket of ``started_at``, type, status, flags);
- a finished forward step attempt counts once in (hour of its end, type, step,
  duration bin), as a failure when its outcome is not ``succeeded``.
Each total also has a coarser copy (``SagaCountHour``: by hour, ``StepStatDay``:
by day), filled by the same compaction, so a 7-day overview reads ~170 hourly
buckets instead of ~2,000 five-minute ones (and exactly: the window's partial
first hour or day comes from the finer table).
Duration bins are quarter-octaves (``bin = floor(4 * log2(ms + 1))``), so a
percentile read from them is within about 19 % of the exact value.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils.dateparse import parse_datetime

from tracking.bulk import Write, upsert, write_all
from tracking.models import (
    Saga,
    SagaCount,
    SagaCountDelta,
    SagaCountHour,
    Step,
    StepStat,
    StepStatDay,
    StepStatDelta,
)

SAGA_BUCKET = timedelta(minutes=5)
SAGA_BUCKET_COARSE = timedelta(hours=1)
STEP_BUCKET = timedelta(hours=1)
STEP_BUCKET_COARSE = timedelta(days=1)
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_LOCK_KEY = 0x5A6A_0001

SagaKey = tuple[datetime, str, str, str]  # bucket, type, status, flags
StepKey = tuple[datetime, str, str, int]  # bucket, type, step, bin


def floor_time(at: datetime, size: timedelta) -> datetime:
    return at - ((at - _EPOCH) % size)


def duration_bin(ms: int) -> int:
    return int(4 * math.log2(max(ms, 0) + 1))


def bin_upper_ms(bin_: int) -> float:
    return 2 ** ((bin_ + 1) / 4) - 1


def percentile(histogram: Counter[int], count: int, q: float) -> float:
    """The upper edge of the duration bin holding the ``q`` quantile (within ~19 %)."""
    rank, seen = q * count, 0
    for bin_ in sorted(histogram):
        seen += histogram[bin_]
        if seen >= rank:
            return round(bin_upper_ms(bin_), 1)
    return round(bin_upper_ms(max(histogram)), 1)


def saga_contribution(
    *, saga_type: str, status: str, flags: str, started_at: datetime | None, event_count: int
) -> Counter[SagaKey]:
    if event_count == 0 or started_at is None:
        return Counter()
    return Counter({(floor_time(started_at, SAGA_BUCKET), saga_type, status, flags): 1})


def saga_row_contribution(row: Any) -> Counter[SagaKey]:
    """The contribution of a stored saga row (a ``Saga`` or a locked-row tuple)."""
    return saga_contribution(
        saga_type=row.saga_type,
        status=row.status,
        flags=row.flags,
        started_at=row.started_at,
        event_count=row.event_count,
    )


def step_contribution(
    *, saga_type: str, steps: Iterable[tuple[str, list[dict[str, Any]]]]
) -> tuple[Counter[StepKey], Counter[StepKey]]:
    """(attempt counts, failure counts) of finished forward attempts.

    Empty when ``SAGAADMIN["STEP_STATS"]`` is off (bench/detect.py measures ingest both ways).
    """
    counts: Counter[StepKey] = Counter()
    failures: Counter[StepKey] = Counter()
    if not settings.SAGAADMIN["STEP_STATS"]:
        return counts, failures
    for name, attempts in steps:
        for record in attempts:
            if record["kind"] != "forward" or record["outcome"] == "running":
                continue
            ended = _time(record["ended_at"])
            began = _time(record["started_at"]) or ended
            if ended is None or began is None:
                continue
            ms = int((ended - began) / timedelta(milliseconds=1))
            key = (floor_time(ended, STEP_BUCKET), saga_type, name, duration_bin(ms))
            counts[key] += 1
            if record["outcome"] != "succeeded":
                failures[key] += 1
    return counts, failures


def _time(value: Any) -> datetime | None:
    return parse_datetime(value) if isinstance(value, str) else value


class Contributions:
    """Accumulates before/after contributions of re-folded sagas; writes the deltas."""

    def __init__(self) -> None:
        self.sagas: Counter[SagaKey] = Counter()
        self.steps: Counter[StepKey] = Counter()
        self.failures: Counter[StepKey] = Counter()

    def add(
        self, *, sign: int, saga: Counter[SagaKey], steps: tuple[Counter[StepKey], Counter[StepKey]]
    ) -> None:
        for saga_key, n in saga.items():
            self.sagas[saga_key] += sign * n
        for step_key, n in steps[0].items():
            self.steps[step_key] += sign * n
        for step_key, n in steps[1].items():
            self.failures[step_key] += sign * n

    def write(self) -> None:
        write_all(self.writes())

    def writes(self) -> list[Write]:
        """The delta rows to append, for :func:`tracking.bulk.write_all`."""
        return [
            Write(
                SagaCountDelta,
                ("bucket", "saga_type", "status", "flags", "delta"),
                [(*k, n) for k, n in self.sagas.items() if n],
            ),
            Write(
                StepStatDelta,
                ("bucket", "saga_type", "step", "bin", "count", "failures"),
                [
                    (*k, n, self.failures.get(k, 0))
                    for k, n in self.steps.items()
                    if n or self.failures.get(k, 0)
                ],
            ),
        ]


def old_steps_get(*, saga_pks: list[int]) -> dict[int, list[tuple[str, list[dict[str, Any]]]]]:
    out: dict[int, list[tuple[str, list[dict[str, Any]]]]] = {}
    for saga_pk, name, attempts in Step.objects.filter(saga_id__in=saga_pks).values_list(
        "saga_id", "name", "attempts"
    ):
        out.setdefault(saga_pk, []).append((name, attempts))
    return out


def rollup_compact() -> bool:
    """Fold committed delta rows into the totals. Returns False if another process is at it."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_LOCK_KEY])
                if not cursor.fetchone()[0]:
                    return False
        saga_totals: Counter[SagaKey] = Counter()
        for bucket, saga_type, status, flags, delta in _delete_returning(
            SagaCountDelta, "bucket, saga_type, status, flags, delta"
        ):
            saga_totals[(_dt(bucket), saga_type, status, flags)] += delta
        step_totals: Counter[StepKey] = Counter()
        step_failures: Counter[StepKey] = Counter()
        for bucket, saga_type, step, bin_, count, failures in _delete_returning(
            StepStatDelta, "bucket, saga_type, step, bin, count, failures"
        ):
            key = (_dt(bucket), saga_type, step, bin_)
            step_totals[key] += count
            step_failures[key] += failures
        _totals_add(saga_totals, step_totals, step_failures)
        _totals_add(
            _coarser(saga_totals, SAGA_BUCKET_COARSE),
            _coarser(step_totals, STEP_BUCKET_COARSE),
            _coarser(step_failures, STEP_BUCKET_COARSE),
            coarse=True,
        )
    return True


def _coarser(totals: Counter[Any], size: timedelta) -> Counter[Any]:
    out: Counter[Any] = Counter()
    for (bucket, *rest), n in totals.items():
        out[(floor_time(bucket, size), *rest)] += n
    return out


def _totals_add(
    sagas: Counter[SagaKey],
    steps: Counter[StepKey],
    failures: Counter[StepKey],
    *,
    coarse: bool = False,
) -> None:
    upsert(
        SagaCountHour if coarse else SagaCount,
        ["bucket", "saga_type", "status", "flags", "count"],
        [(*k, n) for k, n in sagas.items() if n],
        conflict=["bucket", "saga_type", "status", "flags"],
        increment=["count"],
    )
    upsert(
        StepStatDay if coarse else StepStat,
        ["bucket", "saga_type", "step", "bin", "count", "failures"],
        [(*k, n, failures[k]) for k, n in steps.items() if n or failures[k]],
        conflict=["bucket", "saga_type", "step", "bin"],
        increment=["count", "failures"],
    )


def _dt(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite returns text from raw SQL
        parsed = parse_datetime(value)
        assert parsed is not None
        value = parsed
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _delete_returning(model: type, columns: str) -> list[tuple[Any, ...]]:
    table = connection.ops.quote_name(model._meta.db_table)  # type: ignore[attr-defined]
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} RETURNING {columns}")  # noqa: S608
        return list(cursor.fetchall())


def rollups_rebuild() -> None:
    """Recompute every rollup from the read model (after ``rebuild_read_model``)."""
    with transaction.atomic():
        for model in (
            SagaCount,
            SagaCountHour,
            SagaCountDelta,
            StepStat,
            StepStatDay,
            StepStatDelta,
        ):
            model.objects.all().delete()
        totals = Contributions()
        for saga in Saga.objects.filter(event_count__gt=0).iterator(chunk_size=2000):
            totals.add(
                sign=1,
                saga=saga_row_contribution(saga),
                steps=(Counter(), Counter()),
            )
        for saga_type, name, attempts in Step.objects.values_list(
            "saga__saga_type", "name", "attempts"
        ).iterator(chunk_size=5000):
            totals.add(
                sign=1,
                saga=Counter(),
                steps=step_contribution(saga_type=saga_type, steps=[(name, attempts)]),
            )
        totals.write()
    rollup_compact()
