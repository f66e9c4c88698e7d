"""Detection thresholds: each saga type's own settings, the defaults, learned step durations.

:func:`policy_get` returns a :class:`Policy` snapshot, cached per process for
``POLICY_CACHE_SECONDS`` (ingest computes every saga's next check time with
it, so it must be a dict lookup, not a query). Editing a saga type calls
:func:`policy_invalidate` and marks that type's open sagas due, so the
detector applies the new threshold on its next pass in every process.

Learned durations come from the step-duration histograms ingest keeps
(``StepStat``, ``StepStatDay``; tracking/rollups.py) over the last
``LEARN_DAYS`` days.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from tracking.models import Saga, SagaStatus, SagaType, StepStat, StepStatDay, StepStatDelta
from tracking.rollups import STEP_BUCKET, STEP_BUCKET_COARSE, floor_time, percentile

POLICY_CACHE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Learned:
    """A (saga type, step)'s finished forward attempts in the learning window."""

    count: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def failure_rate(self) -> float:
        return self.failures / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True)
class TypePolicy:
    """The thresholds that apply to one saga type (its own, else the defaults)."""

    stuck_after: timedelta
    max_attempts: int
    in_doubt_after: timedelta
    step_thresholds: dict[str, timedelta] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepBound:
    """How long a step may run: a configured threshold or a multiple of its learned p99."""

    limit: timedelta
    source: str  # "configured" or "learned"

    def describe(self) -> str:
        seconds = self.limit.total_seconds()
        if seconds < 10:
            text = f"{seconds:.2g} s"
        elif seconds < 120:
            text = f"{seconds:.0f} s"
        else:
            text = f"{seconds / 60:.1f} min"
        return text + (" (configured)" if self.source == "configured" else " (learned)")


@dataclass(frozen=True, slots=True)
class Policy:
    types: dict[str, TypePolicy]
    default: TypePolicy
    learned: dict[tuple[str, str], Learned]
    p99_multiple: float
    min_samples: int

    def for_type(self, saga_type: str) -> TypePolicy:
        return self.types.get(saga_type, self.default)

    def step_bound(self, saga_type: str, step: str) -> StepBound | None:
        """The step's configured threshold, else its learned bound once it has enough samples."""
        configured = self.for_type(saga_type).step_thresholds.get(step)
        if configured is not None:
            return StepBound(configured, "configured")
        learned = self.learned.get((saga_type, step))
        if learned is None or learned.count < self.min_samples:
            return None
        ms = max(learned.p99_ms * self.p99_multiple, 1.0)
        return StepBound(timedelta(milliseconds=ms), "learned")


def type_policy(row: SagaType | None) -> TypePolicy:
    cfg = settings.SAGAADMIN
    stuck = row.stuck_after_seconds if row and row.stuck_after_seconds else None
    attempts = row.max_attempts if row and row.max_attempts else None
    doubt = row.in_doubt_after_seconds if row and row.in_doubt_after_seconds else None
    return TypePolicy(
        stuck_after=timedelta(seconds=stuck or cfg["STUCK_AFTER_SECONDS"]),
        max_attempts=attempts or cfg["MAX_ATTEMPTS"],
        in_doubt_after=timedelta(seconds=doubt or cfg["IN_DOUBT_AFTER_SECONDS"]),
        step_thresholds={
            name: timedelta(seconds=float(seconds))
            for name, seconds in ((row.step_thresholds or {}) if row else {}).items()
        },
    )


def policy_load(*, now: datetime | None = None) -> Policy:
    """Read the saga types and the learned durations (three small queries)."""
    cfg = settings.SAGAADMIN
    return Policy(
        types={row.name: type_policy(row) for row in SagaType.objects.all()},
        default=type_policy(None),
        learned=learned_durations(now=now or timezone.now(), days=cfg["LEARN_DAYS"]),
        p99_multiple=cfg["SLOW_STEP_P99_MULTIPLE"],
        min_samples=cfg["LEARN_MIN_SAMPLES"],
    )


_cache: dict[str, tuple[float, Policy]] = {}
_cache_lock = threading.Lock()


def policy_get() -> Policy:
    """The process's cached policy, reloaded when older than ``POLICY_CACHE_SECONDS``."""
    with _cache_lock:
        hit = _cache.get("policy")
        if hit is not None and time.monotonic() - hit[0] < POLICY_CACHE_SECONDS:
            return hit[1]
    policy = policy_load()
    with _cache_lock:
        _cache["policy"] = (time.monotonic(), policy)
    return policy


def policy_invalidate() -> None:
    with _cache_lock:
        _cache.clear()


def learned_durations(*, now: datetime, days: int) -> dict[tuple[str, str], Learned]:
    """Per (saga type, step): attempts, failures and duration percentiles of the last ``days``."""
    since = floor_time(now - timedelta(days=days), STEP_BUCKET)
    edge = floor_time(since, STEP_BUCKET_COARSE) + STEP_BUCKET_COARSE
    sources = [
        StepStat.objects.filter(bucket__gte=since, bucket__lt=edge),
        StepStatDay.objects.filter(bucket__gte=edge),
        StepStatDelta.objects.filter(bucket__gte=since),
    ]
    bins: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    failures: Counter[tuple[str, str]] = Counter()
    for qs in sources:
        rows = (
            qs.order_by()
            .values_list("saga_type", "step", "bin")
            .annotate(n=Sum("count"), f=Sum("failures"))
        )
        for saga_type, step, bin_, n, f in rows:
            bins[(saga_type, step)][bin_] += n
            failures[(saga_type, step)] += f
    out = {}
    for key, histogram in bins.items():
        count = sum(histogram.values())
        if count > 0:
            out[key] = Learned(
                count=count,
                failures=failures[key],
                p50_ms=percentile(histogram, count, 0.50),
                p95_ms=percentile(histogram, count, 0.95),
                p99_ms=percentile(histogram, count, 0.99),
            )
    return out


_known_types: set[str] = set()


def saga_types_seen(names: Iterable[str]) -> None:
    """Create ``SagaType`` rows for type names this process has not seen yet (after commit).

    Runs after the ingest transaction commits, in its own statement, so the
    insert never holds a lock inside an ingest transaction.
    """
    new = {n for n in names if n and n not in _known_types}
    if new:
        transaction.on_commit(lambda: _saga_types_create(new))


def _saga_types_create(names: set[str]) -> None:
    SagaType.objects.bulk_create([SagaType(name=n) for n in sorted(names)], ignore_conflicts=True)
    _known_types.update(names)


MAX_THRESHOLD_SECONDS = 30 * 24 * 3600


class InvalidThreshold(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _whole(field_name: str, value: Any, *, most: int, unit: str) -> int | None:
    """A whole number from 1 to ``most`` (text or number), or None for empty (the default)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidThreshold(field_name, f"a whole number of {unit}, or empty for the default")
    try:
        number = float(value)
    except ValueError:
        raise InvalidThreshold(field_name, f"a whole number of {unit}") from None
    if not number.is_integer() or not 1 <= number <= most:
        raise InvalidThreshold(field_name, f"a whole number of {unit} from 1 to {most}")
    return int(number)


def _seconds(field_name: str, value: Any) -> int | None:
    return _whole(field_name, value, most=MAX_THRESHOLD_SECONDS, unit="seconds")


def saga_type_update(*, name: str, changes: dict[str, Any], user: str) -> SagaType:
    """Change a saga type's thresholds (only the keys given); empty means "use the default".

    ``changes`` keys: ``stuck_after_seconds``, ``max_attempts``,
    ``in_doubt_after_seconds``, ``step_thresholds`` ({step: seconds}).
    Then the type's open sagas are due at once, so the next detector pass
    applies the new thresholds, and this process's cached policy is dropped.
    Raises ``SagaType.DoesNotExist`` or :class:`InvalidThreshold` (naming the field).
    """
    known = {"stuck_after_seconds", "max_attempts", "in_doubt_after_seconds", "step_thresholds"}
    for key in changes:
        if key not in known:
            raise InvalidThreshold(key, f"unknown field; one of {', '.join(sorted(known))}")
    with transaction.atomic():
        row = SagaType.objects.select_for_update().get(name=name)
        for key in ("stuck_after_seconds", "in_doubt_after_seconds"):
            if key in changes:
                setattr(row, key, _seconds(key, changes[key]))
        if "max_attempts" in changes:
            row.max_attempts = _whole(
                "max_attempts", changes["max_attempts"], most=1000, unit="attempts"
            )
        if "step_thresholds" in changes:
            steps = changes["step_thresholds"] or {}
            if not isinstance(steps, dict):
                raise InvalidThreshold("step_thresholds", "an object of step name -> seconds")
            cleaned = {}
            for step, seconds in steps.items():
                if not isinstance(step, str) or not 1 <= len(step) <= 100:
                    raise InvalidThreshold("step_thresholds", "step names are 1-100 characters")
                value = _seconds(f"step_thresholds.{step}", seconds)
                if value is not None:
                    cleaned[step] = value
            row.step_thresholds = dict(sorted(cleaned.items()))
        row.updated_at = timezone.now()
        row.updated_by = user
        row.save()
        open_sagas = Saga.objects.filter(saga_type=name).exclude(
            status__in=[SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.CANCELLED]
        )
        # lock them in saga-id order, the order ingest locks in (no deadlock), then mark
        pks = list(open_sagas.select_for_update().order_by("saga_id").values_list("pk", flat=True))
        Saga.objects.filter(pk__in=pks).update(watch_at=row.updated_at)
    policy_invalidate()
    return row
