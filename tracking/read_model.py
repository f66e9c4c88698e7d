"""Writing the read model (``Saga`` and ``Step`` rows) from folded states.

Used by ingest (for the sagas a batch touched) and by ``rebuild_read_model``
(for any or all sagas). Both go through :func:`read_model_refold`, so the two
paths cannot drift apart; ingest creates the rows of sagas it sees for the
first time with :func:`read_model_create` (the same fold and row values, one
INSERT instead of a placeholder row, a lock and an UPDATE).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from tracking import fold_cache
from tracking.bulk import Write, insert_ignore_returning_later, upsert_write, write_all
from tracking.detection import watch_at
from tracking.live import notify_sagas_changed
from tracking.models import Saga, Step, TelemetryEvent, join_delimited
from tracking.policy import policy_get, saga_types_seen
from tracking.projection import Fold, FoldEvent, SagaState
from tracking.rollups import (
    Contributions,
    StepKey,
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
SAGA_WRITE_COLUMNS = ("id", "saga_id", "version", *SAGA_FIELDS, "watch_at")
STEP_WRITE_COLUMNS = ("saga", "name", *STEP_FIELDS)
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
    push fewer per group commit); :meth:`write` at the end of the transaction.
    With ``folds`` (a list; ingest), the folds written are kept in the process's
    fold cache once the transaction commits (tracking/fold_cache.py)."""

    contributions: Contributions = field(default_factory=Contributions)
    versions: list[tuple[str, int]] = field(default_factory=list)
    saga_types: set[str] = field(default_factory=set)
    folds: list[tuple[str, int, int, Fold]] | None = None
    saga_rows: list[list[Any]] = field(default_factory=list)  # of re-folded sagas
    step_rows: list[list[Any]] = field(default_factory=list)  # their steps (upserted)
    new_step_rows: list[list[Any]] = field(default_factory=list)  # steps of created sagas
    revived: dict[str, int] = field(default_factory=dict)  # see read_model_create

    def write(self) -> None:
        """Write the gathered rows (one statement on PostgreSQL: bulk.write_all) and
        schedule the pushes and the folds to keep for after commit."""
        write_all(
            [
                upsert_write(
                    Saga,
                    SAGA_WRITE_COLUMNS,
                    sorted(self.saga_rows, key=lambda r: r[1]),
                    conflict=["saga_id"],
                    update=[*SAGA_FIELDS, "version", "watch_at"],
                ),
                upsert_write(
                    Step,
                    STEP_WRITE_COLUMNS,
                    self.step_rows,
                    conflict=["saga", "name"],
                    update=STEP_FIELDS,
                ),
                Write(Step, STEP_WRITE_COLUMNS, self.new_step_rows),
                *self.contributions.writes(),
            ]
        )
        notify_sagas_changed(versions=self.versions)
        saga_types_seen(self.saga_types)
        if self.folds:
            written = self.folds
            transaction.on_commit(lambda: fold_cache.folds.keep(written))


@dataclass(slots=True)
class _Folded:
    """A locked saga row and its new fold, ready to be written."""

    row: SagaRow
    fold: Fold
    old_steps: tuple[Counter[StepKey], Counter[StepKey]]  # rollup contribution of its step rows
    steps: Collection[str] | None  # the step rows to write; None: all of the fold's
    stale_steps: bool  # stored step rows the fold no longer has may have to go
    counted: Collection[str] | None = None  # steps in ``old_steps``; None: all of them


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
    mine = ReadModelWrites() if writes is None else writes
    old_steps = old_steps_get(saga_pks=[r.pk for r in sagas.values() if r.event_count > 0])
    states: list[SagaState] = []
    todo: dict[str, _Folded] = {}
    for saga_id, row in sagas.items():
        folded = Fold.of(saga_id, events.get(saga_id, ()), skew_threshold=threshold)
        state = folded.state
        states.append(state)
        if bump == "if_changed" and not _differs(
            row, saga_row_values(state), _step_rows(row.pk, state)
        ):
            continue
        old = old_steps.get(row.pk, [])
        todo[saga_id] = _Folded(
            row,
            folded,
            step_contribution(saga_type=row.saga_type, steps=old),
            None,
            # rebuild: the rows may hold anything; ingest: a step may have vanished
            # (its events became anomalies)
            bump == "if_changed" or bool({name for name, _ in old} - state.steps.keys()),
        )
    _folded_write(todo, mine)
    if writes is None:
        mine.write()
    return states


def read_model_extend(
    *, sagas: Mapping[str, SagaRow], events: Mapping[str, list[FoldEvent]], writes: ReadModelWrites
) -> list[str]:
    """Apply ingest's new events to the kept folds of locked sagas and write their rows.

    Uses a saga's fold from the fold cache only if it was kept at the row's
    current version and event count, and only if the new events extend it
    (:meth:`Fold.extend`); then just the steps those events touched are
    written. Returns the saga ids it did not handle: the caller re-folds
    those from the store (:func:`read_model_refold`).
    Precondition: inside a transaction that holds the saga rows' locks.
    """
    assert transaction.get_connection().in_atomic_block
    threshold = skew_threshold()
    todo: dict[str, _Folded] = {}
    rest: list[str] = []
    for saga_id, row in sagas.items():
        kept = fold_cache.folds.take(saga_id, row.pk, row.version)
        if (
            kept is None
            or kept.state.event_count != row.event_count
            or kept.skew_threshold != threshold
        ):
            rest.append(saga_id)
            continue
        # The rollup contribution of the steps the events name, before extend() changes
        # their attempts in place (the other steps do not change: their contribution
        # before and after cancels out, so it is left out, unless the saga's type
        # changes, which moves every step's contribution to the new type).
        names = {e.step for e in events[saga_id]}
        old = step_contribution(
            saga_type=row.saga_type,
            steps=[(st.name, st.attempts) for st in kept.state.steps.values() if st.name in names],
        )
        touched = kept.extend(events[saga_id])
        if touched is None:
            rest.append(saga_id)
            continue
        counted: Collection[str] | None = names
        if kept.state.saga_type != row.saga_type:
            untouched = [
                (st.name, st.attempts) for st in kept.state.steps.values() if st.name not in names
            ]
            more = step_contribution(saga_type=row.saga_type, steps=untouched)
            old = (old[0] + more[0], old[1] + more[1])
            counted = None
        todo[saga_id] = _Folded(row, kept, old, touched, False, counted)
    _folded_write(todo, writes)
    return rest


def _step_rows(pk: int, state: SagaState, names: Iterable[str] | None = None) -> list[list[Any]]:
    steps = state.steps
    return [
        [pk, name, *(getattr(steps[name], f) for f in STEP_FIELDS)]
        for name in (steps if names is None else names)
    ]


def _folded_write(todo: Mapping[str, _Folded], mine: ReadModelWrites) -> None:
    """Write the saga rows (version + 1) and step rows of folded sagas; gather their
    rollup deltas, notifications and saga types in ``mine``."""
    if not todo:
        return
    policy = policy_get()
    contributions = mine.contributions
    saga_rows: list[list[Any]] = []
    step_rows: list[list[Any]] = []
    stale: list[int] = []
    for saga_id, f in todo.items():
        row, state = f.row, f.fold.state
        values = saga_row_values(state)
        version = row.version + 1
        watch = watch_at(state, policy, open_incidents=bool(row.open_incidents))
        saga_rows.append([row.pk, saga_id, version, *values.values(), watch])
        contributions.add(sign=-1, saga=saga_row_contribution(row), steps=f.old_steps)
        _contribution_add(contributions, state, values, steps=f.counted)
        if f.stale_steps:
            stale.append(row.pk)
        step_rows += _step_rows(row.pk, state, f.steps)
        mine.versions.append((saga_id, version))
        mine.saga_types.add(state.saga_type)
        if mine.folds is not None:
            mine.folds.append((saga_id, row.pk, version, f.fold))
    if stale:
        _delete_stale_steps(stale, step_rows)
    mine.saga_rows += saga_rows
    mine.step_rows += step_rows


def read_model_create(
    *,
    events: Mapping[str, list[FoldEvent]],
    writes: ReadModelWrites | None = None,
    placeholders: Collection[str] = (),
) -> set[str]:
    """Insert the rows of sagas that have none yet, folded from ``events`` alone.

    For ingest: a saga without a row has no stored events either (both are
    written in one transaction), so the batch's events are all of them. A saga
    whose row exists, or that a concurrent transaction creates first, is left
    out (the INSERT skips it) and not in the returned ids: the caller locks and
    re-folds those. Rows go in saga-id order, like every saga write. ``writes``
    as for :func:`read_model_refold`.

    ``placeholders``: sagas believed to have a row (ingest keeps their folds), sent
    in the same INSERT as empty rows (version 0, no events), so that every saga
    row ingest may create is inserted in one statement in saga-id order. Such a
    row is stored only when the saga's row was gone (deleted by hand, a database
    emptied under the process); those land in ``writes.revived`` (saga id -> row
    id), for the caller to re-fold from the store.
    Precondition: inside a transaction.
    """
    return read_model_create_later(events=events, writes=writes, placeholders=placeholders)()


def read_model_create_later(
    *,
    events: Mapping[str, list[FoldEvent]],
    writes: ReadModelWrites | None = None,
    placeholders: Collection[str] = (),
) -> Callable[[], set[str]]:
    """:func:`read_model_create`, its INSERT sent now; the returned function reads its
    result, does the rest and gives the ids of the sagas created (in pipeline mode
    statements sent after it wait for the server together with it)."""
    assert transaction.get_connection().in_atomic_block
    threshold = skew_threshold()
    policy = policy_get()
    folds = {s: Fold.of(s, events[s], skew_threshold=threshold) for s in events}
    rows = [
        [s, 1, *saga_row_values(f.state).values(), watch_at(f.state, policy, open_incidents=False)]
        for s, f in folds.items()
    ]
    empty = [*saga_row_values(SagaState(saga_id="")).values(), None]
    rows += [[s, 0, *empty] for s in placeholders if s not in folds]
    rows.sort(key=lambda r: str(r[0]))
    sent = insert_ignore_returning_later(
        Saga,
        ["saga_id", "version", *SAGA_FIELDS, "watch_at"],
        rows,
        conflict=("saga_id",),
        returning=("saga_id", "id"),
    )

    def finish() -> set[str]:
        inserted = dict(sent())
        created = {s: pk for s, pk in inserted.items() if s in folds}
        mine = ReadModelWrites() if writes is None else writes
        mine.revived.update((s, pk) for s, pk in inserted.items() if s not in folds)
        step_rows: list[list[Any]] = []
        for saga_id, pk in created.items():
            state = folds[saga_id].state
            _contribution_add(mine.contributions, state, saga_row_values(state))
            step_rows += _step_rows(pk, state)
            if mine.folds is not None:
                mine.folds.append((saga_id, pk, 1, folds[saga_id]))
        if created:
            mine.new_step_rows += step_rows
            mine.versions += [(saga_id, 1) for saga_id in created]
            mine.saga_types.update(folds[s].state.saga_type for s in created)
        if writes is None:
            mine.write()
        return set(created)

    return finish


def _contribution_add(
    contributions: Contributions,
    state: SagaState,
    values: dict[str, object],
    *,
    steps: Collection[str] | None = None,
) -> None:
    """Add a folded saga's rollup contribution (its status bucket, its finished steps;
    of the ``steps`` named, or all)."""
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
            steps=[
                (s.name, s.attempts)
                for s in state.steps.values()
                if steps is None or s.name in steps
            ],
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
