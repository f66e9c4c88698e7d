"""Writing the read model (``Saga`` and ``Step`` rows) from folded states.

Used by ingest (for the sagas a batch touched) and by ``rebuild_read_model``
(for any or all sagas). Both go through :func:`read_model_refold`, so the two
paths cannot drift apart; ingest creates the rows of sagas it sees for the
first time with :func:`read_model_create` (the same fold and row values, one
INSERT instead of a placeholder row, a lock and an UPDATE).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from tracking.bulk import append, insert_ignore_returning, upsert
from tracking.detection import watch_at
from tracking.live import notify_sagas_changed
from tracking.models import Saga, Step, TelemetryEvent, join_delimited
from tracking.policy import policy_get, saga_types_seen
from tracking.projection import FoldEvent, SagaState, fold
from tracking.rollups import (
    Contributions,
    old_steps_get,
    rollups_rebuild,
    saga_contribution,
    saga_row_contribution,
    step_contribution,
)

SAGA_FIELDS = [
    "saga_type",
    "status",
    "current_step",
    "started_at",
    "ended_at",
    "last_event_at",
    "last_received_at",
    "duration_ms",
    "deadline",
    "last_error",
    "idempotency_key",
    "attributes",
    "services",
    "trace_ids",
    "flags",
    "anomalies",
    "event_count",
]
STEP_FIELDS = [
    "position",
    "service",
    "status",
    "attempt",
    "started_at",
    "ended_at",
    "duration_ms",
    "deadline",
    "last_error",
    "idempotency_key",
    "compensation_attempt",
    "attempts",
]
FOLD_COLUMNS = (
    "saga_id",
    "service__name",
    "event_id",
    "type",
    "occurred_at",
    "received_at",
    "saga_type",
    "step",
    "attempt",
    "sequence",
    "deadline",
    "idempotency_key",
    "error",
    "attributes",
    "trace_id",
)


class SagaRow(Protocol):
    """What re-folding reads of a locked saga row (a ``Saga`` or ingest's ``LockedSaga``)."""

    @property
    def pk(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def event_count(self) -> int: ...
    @property
    def saga_type(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def flags(self) -> str: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def open_incidents(self) -> str: ...


@dataclass(slots=True)
class ReadModelWrites:
    """What projecting writes besides the saga and step rows: rollup deltas, live
    notifications, saga types seen. Gathered so that one ingest transaction that
    both creates and re-folds sagas writes them once (two statements and one
    push fewer per group commit); :meth:`write` at the end of the transaction."""

    contributions: Contributions = field(default_factory=Contributions)
    versions: list[tuple[str, int]] = field(default_factory=list)
    saga_types: set[str] = field(default_factory=set)

    def write(self) -> None:
        self.contributions.write()
        notify_sagas_changed(versions=self.versions)
        saga_types_seen(self.saga_types)


def skew_threshold() -> timedelta:
    return timedelta(seconds=settings.SAGAADMIN["CLOCK_SKEW_SECONDS"])


def stored_events_get(*, saga_ids: Iterable[str]) -> dict[str, list[FoldEvent]]:
    """A saga's stored events as fold inputs, grouped by saga id."""
    grouped: dict[str, list[FoldEvent]] = defaultdict(list)
    rows = TelemetryEvent.objects.filter(saga_id__in=list(saga_ids)).values_list(*FOLD_COLUMNS)
    for (
        saga_id,
        service,
        event_id,
        type_,
        occurred_at,
        received_at,
        saga_type,
        step,
        attempt,
        sequence,
        deadline,
        idempotency_key,
        error,
        attributes,
        trace_id,
    ) in rows:
        grouped[saga_id].append(
            FoldEvent(
                service=service,
                event_id=event_id,
                type=type_,
                occurred_at=occurred_at.astimezone(UTC),
                received_at=received_at.astimezone(UTC),
                saga_type=saga_type,
                step=step,
                attempt=attempt,
                sequence=sequence,
                deadline=deadline.astimezone(UTC) if deadline else None,
                idempotency_key=idempotency_key,
                error=error,
                attributes=attributes or {},
                trace_id=trace_id,
            )
        )
    return grouped


def saga_row_values(state: SagaState) -> dict[str, object]:
    """Column values in ``SAGA_FIELDS`` order."""
    special = {"flags": join_delimited(state.flags), "services": join_delimited(state.services)}
    return {name: special.get(name, getattr(state, name)) for name in SAGA_FIELDS}


def read_model_refold(
    *,
    sagas: Mapping[str, SagaRow],
    events: Mapping[str, list[FoldEvent]],
    bump: str = "always",
    writes: ReadModelWrites | None = None,
) -> list[SagaState]:
    """Fold each saga's events and write its rows.

    ``sagas`` are the locked ``Saga`` rows (they must exist). ``bump="always"``
    (ingest: new events arrived) increases the version of every saga;
    ``bump="if_changed"`` (rebuild) only of those whose rows change. With
    ``writes``, the rollup deltas and notifications go there for the caller to
    write; without, they are written here.
    Precondition: inside a transaction that holds the saga rows' locks.
    """
    assert transaction.get_connection().in_atomic_block
    threshold = skew_threshold()
    policy = policy_get()
    mine = ReadModelWrites() if writes is None else writes
    contributions = mine.contributions
    old_steps = old_steps_get(saga_pks=[r.pk for r in sagas.values() if r.event_count > 0])
    states: list[SagaState] = []
    saga_rows: list[list[Any]] = []
    step_rows: list[list[Any]] = []
    had_steps: list[int] = []
    for saga_id, row in sagas.items():
        state = fold(saga_id, events.get(saga_id, ()), skew_threshold=threshold)
        states.append(state)
        values = saga_row_values(state)
        steps = [
            [row.pk, s.name, *(getattr(s, f) for f in STEP_FIELDS)] for s in state.steps.values()
        ]
        if bump == "if_changed" and not _differs(row, values, steps):
            continue
        watch = watch_at(state, policy, open_incidents=bool(row.open_incidents))
        saga_rows.append([row.pk, saga_id, row.version + 1, *values.values(), watch])
        contributions.add(
            sign=-1,
            saga=saga_row_contribution(row),
            steps=step_contribution(saga_type=row.saga_type, steps=old_steps.get(row.pk, [])),
        )
        _contribution_add(contributions, state, values)
        if bump == "if_changed":
            had_steps.append(row.pk)  # rebuild: the rows may hold anything
        elif {name for name, _ in old_steps.get(row.pk, ())} - state.steps.keys():
            had_steps.append(row.pk)  # a step vanished (its events became anomalies)
        step_rows += steps
    if saga_rows:
        upsert(
            Saga,
            ["id", "saga_id", "version", *SAGA_FIELDS, "watch_at"],
            saga_rows,
            conflict=["saga_id"],
            update=[*SAGA_FIELDS, "version", "watch_at"],
        )
        if had_steps:
            _delete_stale_steps(had_steps, step_rows)
        upsert(
            Step,
            ["saga", "name", *STEP_FIELDS],
            step_rows,
            conflict=["saga", "name"],
            update=STEP_FIELDS,
        )
        mine.versions += [(r[1], r[2]) for r in saga_rows]
        mine.saga_types.update(s.saga_type for s in states)
    if writes is None:
        mine.write()
    return states


def read_model_create(
    *, events: Mapping[str, list[FoldEvent]], writes: ReadModelWrites | None = None
) -> set[str]:
    """Insert the rows of sagas that have none yet, folded from ``events`` alone.

    For ingest: a saga without a row has no stored events either (both are
    written in one transaction), so the batch's events are all of them. A saga
    whose row exists, or that a concurrent transaction creates first, is left
    out (the INSERT skips it) and not in the returned ids: the caller locks and
    re-folds those. Rows go in saga-id order, like every saga write. ``writes``
    as for :func:`read_model_refold`.
    Precondition: inside a transaction.
    """
    assert transaction.get_connection().in_atomic_block
    threshold = skew_threshold()
    policy = policy_get()
    states = {s: fold(s, events[s], skew_threshold=threshold) for s in sorted(events)}
    values = {s: saga_row_values(state) for s, state in states.items()}
    created = dict(
        insert_ignore_returning(
            Saga,
            ["saga_id", "version", *SAGA_FIELDS, "watch_at"],
            [
                [s, 1, *v.values(), watch_at(states[s], policy, open_incidents=False)]
                for s, v in values.items()
            ],
            conflict=("saga_id",),
            returning=("saga_id", "id"),
        )
    )
    mine = ReadModelWrites() if writes is None else writes
    step_rows: list[list[Any]] = []
    for saga_id, pk in created.items():
        state = states[saga_id]
        _contribution_add(mine.contributions, state, values[saga_id])
        step_rows += [
            [pk, st.name, *(getattr(st, f) for f in STEP_FIELDS)] for st in state.steps.values()
        ]
    if created:
        append(Step, ["saga", "name", *STEP_FIELDS], step_rows)
        mine.versions += [(saga_id, 1) for saga_id in created]
        mine.saga_types.update(states[s].saga_type for s in created)
    if writes is None:
        mine.write()
    return set(created)


def _contribution_add(
    contributions: Contributions, state: SagaState, values: dict[str, object]
) -> None:
    """Add a folded saga's rollup contribution (its status bucket, its finished steps)."""
    contributions.add(
        sign=1,
        saga=saga_contribution(
            saga_type=state.saga_type,
            status=state.status,
            flags=str(values["flags"]),
            started_at=state.started_at,
            event_count=state.event_count,
        ),
        steps=step_contribution(
            saga_type=state.saga_type,
            steps=[(s.name, s.attempts) for s in state.steps.values()],
        ),
    )


def _delete_stale_steps(saga_pks: list[int], steps: list[list[Any]]) -> None:
    """Drop step rows the new fold no longer has.

    A step can vanish when a late event reorders the timeline and turns the
    step's only event into an anomaly (e.g. it now sorts after saga.completed).
    """
    names: dict[int, list[str]] = defaultdict(list)
    for step in steps:
        names[step[0]].append(step[1])
    stale = Q()
    for pk in saga_pks:
        stale |= Q(saga_id=pk) & ~Q(name__in=names.get(pk, []))
    Step.objects.filter(stale).delete()


def _differs(row: Any, values: dict[str, object], steps: list[list[Any]]) -> bool:
    if any(getattr(row, k) != v for k, v in values.items()):
        return True
    current = {
        s.name: [row.pk, s.name, *(getattr(s, f) for f in STEP_FIELDS)] for s in row.steps.all()
    }
    return current != {str(s[1]): s for s in steps}


def read_model_rebuild(*, saga_id: str | None = None, batch_size: int = 500) -> dict[str, int]:
    """Rebuild the read model from the event store (all sagas, or one).

    Sagas with events but no row are created, rows without events deleted;
    versions increase only where the rebuilt rows differ.
    """
    ids_qs = TelemetryEvent.objects.values_list("saga_id", flat=True).distinct().order_by("saga_id")
    if saga_id is not None:
        ids_qs = ids_qs.filter(saga_id=saga_id)
    counts = {"sagas": 0, "changed": 0, "deleted": 0}
    ids = list(ids_qs)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        with transaction.atomic():
            Saga.objects.bulk_create([Saga(saga_id=s) for s in chunk], ignore_conflicts=True)
            rows = {
                s.saga_id: s
                for s in Saga.objects.select_for_update()
                .filter(saga_id__in=chunk)
                .order_by("saga_id")
                .prefetch_related("steps")  # _differs compares them: one query, not one per saga
            }
            before = {k: v.version for k, v in rows.items()}
            read_model_refold(
                sagas=rows, events=stored_events_get(saga_ids=chunk), bump="if_changed"
            )
            after = dict(Saga.objects.filter(saga_id__in=chunk).values_list("saga_id", "version"))
            counts["sagas"] += len(chunk)
            counts["changed"] += sum(1 for k in chunk if after[k] != before[k])
    orphans = Saga.objects.exclude(saga_id__in=TelemetryEvent.objects.values("saga_id"))
    if saga_id is not None:
        orphans = orphans.filter(saga_id=saga_id)
    counts["deleted"] = orphans.delete()[1].get(Saga._meta.label, 0)
    rollups_rebuild()
    return counts
