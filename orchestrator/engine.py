"""The orchestrator's transitions: each one transaction of state + telemetry + outbox messages.

A worker (orchestrator/worker.py) claims a run and calls :func:`run_advance`
until it returns False (the run waits: a retry's backoff, a remote reply, a
circuit, or it finished). One call is one transition:

* forward: attempt the current step (local and tcc actions run inside the
  transition, in a savepoint: their database writes commit with the step or
  not at all; remote steps send a command and wait), then confirm prepared
  tcc participants, then complete;
* a failed attempt is retried per the step's policy (``next_run_at``, never a
  sleep), else compensation starts;
* compensation: completed steps in reverse order, each with its own retries;
  one that finally fails ends the saga ``compensation_failed``.

Fencing: every transition locks the run row and checks the claim's lease
token, so a worker whose lease expired (another took over) cannot write; a
reply is accepted only for the command id the step is waiting for.
Lock order: the run rows (a round's in primary-key order), then tracking's
rows (through the reporter). Rows a round's transitions lock besides (circuit
rows, an action's own) can conflict with another worker's round: the database
then aborts one round, which is retried one run at a time (orchestrator/worker.py).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models.constants import OnConflict
from django.utils import timezone

import outbox
from orchestrator import circuit
from orchestrator.context import StepContext, idempotency_key
from orchestrator.definitions import (
    RetryPolicy,
    SagaDefinition,
    Step,
    StepFailed,
    definition_get,
)
from orchestrator.models import RunStatus, SagaRun, StepRun, StepRunStatus
from orchestrator.reporting import Telemetry, telemetry_send
from orchestrator.rows import rows_update
from sagaadmin import telemetry

log = logging.getLogger(__name__)
COMMANDS_TOPIC = "sagaadmin.commands"
REPLIES_TOPIC = "sagaadmin.replies"
DONE = (StepRunStatus.SUCCEEDED, StepRunStatus.SKIPPED)


class StepTimeout(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's hold on a run: transitions check the token (fencing)."""

    pk: int
    token: int
    owner: str


_fault_hits: dict[str, int] = {}
FAULT_EXIT = 86


def fault(point: str) -> None:
    """Crash-test hook: ``SAGAADMIN_ORCHESTRATOR_FAULT=<point>@<n>`` kills the process
    the n-th time it passes ``point`` (tests/orchestrator/test_crash.py)."""
    wanted = os.environ.get("SAGAADMIN_ORCHESTRATOR_FAULT", "")
    if not wanted.startswith(point + "@"):
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if str(_fault_hits[point]) == wanted.rpartition("@")[2]:
        log.warning("orchestrator: fault injected at %s, exiting", wanted)
        os._exit(FAULT_EXIT)


def _lease() -> timedelta:
    return timedelta(seconds=settings.ORCHESTRATOR["LEASE_SECONDS"])


def json_value(value: Any) -> Any:
    """``value`` as JSON data, or TypeError naming what is not."""
    try:
        return msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"not JSON-serialisable: {exc}") from exc


# -- start ------------------------------------------------------------------


class StartRefused(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def saga_start(*, saga_type: str, saga_id: str, data: dict[str, Any] | None = None) -> SagaRun:
    """Start a saga of a registered type; idempotent on ``saga_id`` (returns the existing run).

    Joins the caller's transaction: a service starts a saga together with its
    own change. Raises :class:`StartRefused` naming a bad argument, or
    ``UnknownSagaType``.
    """
    definition = definition_get(saga_type)
    clean = {_saga_id(saga_id, "saga_id"): _data(data, "data")}
    # The saga's trace: the caller's, or (tracing on, no caller's) one of its own.
    with telemetry.span("saga start", saga_id=saga_id, saga_type=saga_type):
        return _start(definition, saga_type, clean)[saga_id]


def sagas_start(
    *, saga_type: str, sagas: Iterable[tuple[str, dict[str, Any] | None]]
) -> list[SagaRun]:
    """Start many sagas of one type — ``(saga_id, data)`` pairs — in one transaction.

    What ``saga_start`` does for each (idempotent on each saga id; a saga id
    given twice starts one saga, with the first data), with the statements
    shared: a batch job or an import starting a thousand sagas pays for a few
    statements, not a thousand transactions. Joins the caller's transaction.
    The sagas share the start's trace (tracing on: the caller's, or the
    ``sagas start`` span's).
    Returns the runs in the order given. A bad pair refuses them all
    (:class:`StartRefused` naming ``sagas[i].saga_id`` or ``sagas[i].data``).
    """
    definition = definition_get(saga_type)
    clean: dict[str, dict[str, Any]] = {}
    fields: dict[str, str] = {}
    order: list[str] = []
    for i, pair in enumerate(sagas):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise StartRefused(f"sagas[{i}]", "a (saga_id, data) pair")
        saga_id, data = pair
        order.append(_saga_id(saga_id, f"sagas[{i}].saga_id"))
        checked = _data(data, f"sagas[{i}].data")
        if saga_id not in clean:
            clean[saga_id] = checked
            fields[saga_id] = f"sagas[{i}].saga_id"
    if not clean:
        return []
    with telemetry.span("sagas start", saga_type=saga_type, sagas=len(clean)):
        runs = _start(definition, saga_type, clean, fields)
    return [runs[saga_id] for saga_id in order]


def _saga_id(saga_id: Any, field: str) -> str:
    if not isinstance(saga_id, str) or not saga_id or len(saga_id) > 200:
        raise StartRefused(field, "1 to 200 characters")
    return saga_id


def _data(data: Any, field: str) -> dict[str, Any]:
    if data is not None and not isinstance(data, dict):
        raise StartRefused(field, "a JSON object")
    try:
        clean: dict[str, Any] = json_value(data or {})
    except TypeError as exc:
        raise StartRefused(field, str(exc)) from None
    return clean


def _start(
    definition: SagaDefinition,
    saga_type: str,
    clean: dict[str, dict[str, Any]],
    fields: dict[str, str] | None = None,
) -> dict[str, SagaRun]:
    """The runs of the saga ids in ``clean`` (id -> data): those that exist, and the
    others created with their steps and ``saga.started`` events. ``fields``: the
    argument each saga id came in, for errors (default ``saga_id``)."""
    fields = fields or {}
    now = timezone.now()
    trace = telemetry.traceparent()  # the start's: one for all of them
    with transaction.atomic():
        candidates = [
            SagaRun(
                saga_id=saga_id,
                saga_type=saga_type,
                data=clean[saga_id],
                next_run_at=now,
                created_at=now,
                updated_at=now,
                traceparent=trace,
                report_seq=1,  # its saga.started event, reported below
            )
            for saga_id in sorted(clean)  # one order: no deadlock with concurrent starts
        ]
        fresh = _inserted(candidates)  # an id already started (or being started) is skipped
        created = {r.saga_id for r in fresh}
        taken = [saga_id for saga_id in clean if saga_id not in created]
        runs = (
            _of_type(SagaRun.objects.filter(saga_id__in=taken), saga_type, fields) if taken else {}
        )
        missing = sorted(set(taken) - set(runs))
        if missing:  # skipped by the insert for another reason than an existing saga id
            raise RuntimeError(f"saga runs could not be inserted: {', '.join(missing[:5])}")
        if fresh:
            StepRun.objects.bulk_create(
                StepRun(run=run, name=s.name, position=i, kind=s.kind)
                for run in fresh
                for i, s in enumerate(definition.steps)
            )
            reports = []
            for run in fresh:
                run.report_seq = 0  # the row says 1 already: the number this event takes
                tel = Telemetry(run, definition.service)
                tel.add("saga.started", now, attributes=_attributes(run.data))
                reports.append(tel)
            telemetry_send(reports)
        runs.update({run.saga_id: run for run in fresh})
    return runs


_RUN_INSERT_FIELDS = [f for f in SagaRun._meta.concrete_fields if not f.primary_key]


def _inserted(candidates: list[SagaRun]) -> list[SagaRun]:
    """``INSERT … ON CONFLICT DO NOTHING RETURNING id, saga_id`` (one statement, no
    savepoint): the candidates whose saga id was free, with their primary keys.

    A concurrent start of the same id makes the insert wait for it; if it
    commits, the id is skipped here and read as an existing run.
    """
    meta = SagaRun._meta
    assert meta.pk is not None
    pks: dict[str, int] = {}
    size = max(connection.ops.bulk_batch_size(_RUN_INSERT_FIELDS, candidates), 1)
    for at in range(0, len(candidates), size):  # SQLite caps a statement's parameters
        # bulk_create's own insert (it refuses RETURNING with ignore_conflicts)
        returned = SagaRun.objects.all()._insert(  # type: ignore[attr-defined]
            candidates[at : at + size],
            fields=_RUN_INSERT_FIELDS,
            returning_fields=[meta.pk, meta.get_field("saga_id")],
            on_conflict=OnConflict.IGNORE,
        )
        pks.update({saga_id: pk for pk, saga_id in returned or []})
    fresh = []
    for run in candidates:
        if run.saga_id in pks:
            run.pk = pks[run.saga_id]
            run._state.adding, run._state.db = False, SagaRun.objects.db
            fresh.append(run)
    return fresh


def _of_type(runs: Iterable[SagaRun], saga_type: str, fields: dict[str, str]) -> dict[str, SagaRun]:
    """The runs by saga id; :class:`StartRefused` if one is of another saga type."""
    out = {}
    for run in runs:
        if run.saga_type != saga_type:
            field = fields.get(run.saga_id, "saga_id")
            raise StartRefused(field, f"already used by a saga of type {run.saga_type}")
        out[run.saga_id] = run
    return out


def _attributes(data: dict[str, Any]) -> dict[str, Any]:
    """The saga's scalar inputs as searchable attributes (at most 20)."""
    scalars = {
        k: v
        for k, v in data.items()
        if isinstance(v, str | int | float | bool)
        and len(k) <= 100
        and k.replace("_", "").isalnum()
    }
    return dict(list(scalars.items())[:20])


# -- advancing a claimed run --------------------------------------------------


def run_advance(claim: Claim, *, now: datetime | None = None) -> bool:
    """One transition of a claimed run. True: it may advance again at once."""
    return bool(runs_advance([claim], now=now))


# A group stops taking transitions this long after it began (slow actions keep
# the group's rows locked and its commit waiting); the rest wait for the next.
GROUP_SECONDS = 0.1

# A worker's step rows of the runs it holds, from its last committed transition:
# run pk -> (the run's version then, its steps). Valid while the run's version
# is unchanged: every writer of step rows (transitions, replies, operator hooks)
# bumps it.
StepsKept = dict[int, tuple[int, list[StepRun]]]


def runs_advance(
    claims: Sequence[Claim], *, now: datetime | None = None, kept: StepsKept | None = None
) -> list[Claim]:
    """One transition of each claimed run, all in one transaction: a group commit.

    Each transition is what it is alone — the run's new state, the steps it
    changed, its telemetry and outbox messages — and the group's transitions
    commit together or not at all, so every transition stays atomic and
    durable; what the group saves is the fixed cost of a transaction per
    transition (its locks, reads, writes and commit, one statement each for
    all of them). A crash before the commit rolls back every transition of the
    group, as it would the one transition in hand: their actions' database
    writes go with them, and their actions run again with the same
    idempotency key. Runs whose claim was fenced off, which are not due, or
    which the group's time budget (``GROUP_SECONDS``) left out are skipped.

    Runs are locked in primary-key order and advanced in ``claims``' order.
    A run that waits or ended is handed back (its lease cleared) in the same
    transaction. ``kept``: the caller's :data:`StepsKept` across calls (its
    step rows are then read only for runs whose version moved). Returns the
    claims whose runs may advance again at once, those the time budget left
    out first (so a slow run cannot keep others out round after round). An
    exception rolls back the whole group; the caller then advances the runs
    one by one (``run_advance``) to find the one at fault.
    """
    if not claims:
        return []
    held = {c.pk: c for c in claims}
    kept = {} if kept is None else kept
    again: list[Claim] = []
    later: list[Claim] = []  # left out by the time budget: first in the next round
    done: list[Transition] = []
    try:
        with transaction.atomic(durable=True):
            locked = {
                run.pk: run
                for run in SagaRun.objects.select_for_update()
                .filter(pk__in=held, lease_owner__in={c.owner for c in claims})
                .order_by("pk")  # one lock order for every worker
                if run.lease_token == held[run.pk].token and run.lease_owner == held[run.pk].owner
            }  # any other: fenced, the lease went to another worker
            runs = [locked[c.pk] for c in claims if c.pk in locked]  # in the caller's order
            steps_of = _steps(runs, kept)
            idle: list[SagaRun] = []  # not due, paused or ended: handed back
            began = time.monotonic()
            for run in runs:
                at = now or timezone.now()
                if run.is_terminal or run.paused or (run.next_run_at and run.next_run_at > at):
                    idle.append(run)
                    continue
                if done and time.monotonic() - began > GROUP_SECONDS:
                    later.append(held[run.pk])  # still due and still ours
                    continue
                definition = definition_get(run.saga_type)
                steps = steps_of[run.pk]
                before = steps_snapshot(steps)
                with (
                    telemetry.continued({"traceparent": run.traceparent}),
                    telemetry.span(
                        "orchestrator transition", saga_id=run.saga_id, saga_type=run.saga_type
                    ),
                ):
                    tel = Telemetry(run, definition.service)
                    go_on = _transition(run, definition, steps, tel, at) and not run.is_terminal
                if go_on:
                    run.lease_until = timezone.now() + _lease()  # still working on it
                    again.append(held[run.pk])
                else:  # it waits or ended: handed back with this write
                    run.lease_owner, run.lease_until = "", None
                done.append(Transition(run, steps, before, tel))
            transitions_save(done)
            if idle:
                SagaRun.objects.filter(pk__in=[r.pk for r in idle]).update(
                    lease_owner="", lease_until=None
                )
            fault("after-transition-before-commit")
    except BaseException:
        for pk in held:  # changed in memory, not in the database
            kept.pop(pk, None)
        raise
    for t in done:
        kept[t.run.pk] = (t.run.version, t.steps)
    fault("after-transition")
    return later + again


def _steps(runs: list[SagaRun], kept: StepsKept) -> dict[int, list[StepRun]]:
    """The runs' step rows in position order: kept ones where the run's version
    is the kept one, the others read (one query)."""
    steps_of: dict[int, list[StepRun]] = {}
    for run in runs:
        version, steps = kept.get(run.pk, (None, []))
        if version == run.version:
            steps_of[run.pk] = steps
    unknown = [run.pk for run in runs if run.pk not in steps_of]
    if unknown:
        steps_of.update({pk: [] for pk in unknown})
        for step in StepRun.objects.filter(run_id__in=unknown).order_by("run_id", "position"):
            steps_of[step.run_id].append(step)
    return steps_of


STEP_FIELDS = (
    "status",
    "attempt",
    "attempt_base",
    "compensation_attempt",
    "compensation_base",
    "epoch",
    "tx_state",
    "command_id",
    "deadline",
    "started_at",
    "ended_at",
    "last_error",
)
# every column of the run but its key (what ``run.save()`` writes)
RUN_FIELDS = tuple(f.attname for f in SagaRun._meta.concrete_fields if not f.primary_key)


def steps_snapshot(steps: list[StepRun]) -> dict[int, tuple[Any, ...]]:
    return {s.pk: tuple(getattr(s, f) for f in STEP_FIELDS) for s in steps}


@dataclass(frozen=True, slots=True)
class Transition:
    """A run changed in memory by one transition, not yet written."""

    run: SagaRun
    steps: list[StepRun]
    before: dict[int, tuple[Any, ...]]  # steps_snapshot() of the steps before it
    telemetry: Telemetry


def transition_save(
    run: SagaRun, steps: list[StepRun], before: dict[int, tuple[Any, ...]], tel: Telemetry
) -> None:
    """Write the run, the steps the transition changed (usually one), then report."""
    transitions_save([Transition(run, steps, before, tel)])


def transitions_save(done: Sequence[Transition]) -> None:
    """Write the runs (version + 1), the steps their transitions changed, then report
    their events: one statement per table and one report per service, whatever
    the number of transitions."""
    if not done:
        return
    at = timezone.now()
    changed: list[StepRun] = []
    for t in done:
        t.run.version += 1
        t.run.updated_at = at
        changed.extend(
            s for s in t.steps if tuple(getattr(s, f) for f in STEP_FIELDS) != t.before[s.pk]
        )
    rows_update(SagaRun, [t.run for t in done], RUN_FIELDS)
    rows_update(StepRun, changed, STEP_FIELDS)
    telemetry_send([t.telemetry for t in done])


def _transition(
    run: SagaRun, definition: SagaDefinition, steps: list[StepRun], tel: Telemetry, now: datetime
) -> bool:
    if run.status == RunStatus.RUNNING:
        return _forward(run, definition, steps, tel, now)
    if run.status == RunStatus.COMPENSATING:
        return _backward(run, definition, steps, tel, now)
    return False


def _forward(
    run: SagaRun, definition: SagaDefinition, steps: list[StepRun], tel: Telemetry, now: datetime
) -> bool:
    current = next((s for s in steps if s.status not in DONE), None)
    if current is None:
        prepared = next((s for s in steps if s.tx_state == "prepared"), None)
        if prepared is not None:
            return _confirm(run, definition.step(prepared.name), prepared, tel, now)
        run.status = RunStatus.COMPLETED
        run.ended_at = now
        run.next_run_at = None
        run.waiting = ""
        tel.add("saga.completed", now)
        return False
    spec = definition.step(current.name)
    if current.status == StepRunStatus.RUNNING:  # a remote command is out
        if current.deadline is not None and now >= current.deadline:
            circuit.record(spec.service, ok=False, now=now)
            return _failed(
                run, steps, spec, current, tel, now, _timeout_error(spec), timed_out=True
            )
        run.next_run_at = current.deadline
        return False
    if spec.kind == "remote":
        return _send(run, spec, current, tel, now, phase="forward")
    return _attempt(run, steps, spec, current, tel, now)


def _timeout_error(spec: Step) -> dict[str, Any]:
    return {"type": "timeout", "message": f"no answer within {spec.timeout:g} s", "retryable": True}


def _attempt(
    run: SagaRun, steps: list[StepRun], spec: Step, step: StepRun, tel: Telemetry, now: datetime
) -> bool:
    """Run a local (or tcc prepare) action in a savepoint of this transition."""
    step.attempt += 1
    step.epoch = run.epoch
    step.status = StepRunStatus.RUNNING
    step.started_at = now
    step.ended_at = None
    key = idempotency_key(run.saga_id, step.name, run.epoch)
    tel.add("step.started", now, step=step.name, attempt=step.attempt, idempotency_key=key)
    ctx = _context(run, step, "forward", step.attempt)
    assert spec.action is not None
    result, error = _call(spec.action, ctx, spec.timeout, spec.retry)
    end = timezone.now()
    if error is not None:
        return _failed(
            run, steps, spec, step, tel, end, error, timed_out=error["type"] == "timeout"
        )
    step.status = StepRunStatus.SUCCEEDED
    step.ended_at = end
    step.last_error = None
    if result is not None:
        run.results = {**run.results, step.name: result}
    tel.add("step.succeeded", end, step=step.name, attempt=step.attempt, idempotency_key=key)
    if spec.kind == "tcc":
        step.tx_state = "prepared"
        tel.add("tx.prepared", end, step=step.name, idempotency_key=key)
    run.next_run_at = end
    run.waiting = ""
    return True


def _call(
    action: Any, ctx: StepContext, timeout: float, retry: RetryPolicy
) -> tuple[Any, dict[str, Any] | None]:
    """(result, None) or (None, error); the action's writes roll back when it fails.

    The savepoint that undoes them is taken just before the action's first
    statement through Django's connection (an execute wrapper), so an action
    that writes nothing costs no round trip for it. Writes that bypass the
    execute wrappers (``cursor.copy()``, a raw psycopg cursor) must run inside
    ``transaction.atomic()`` in the action, whose own SAVEPOINT passes through
    the wrapper. A lock conflict (deadlock, serialization failure, lock not
    available) is not the action's failure: it is raised, and the round is
    retried (the run alone).
    """
    savepoint = _LazySavepoint()
    started = time.monotonic()
    try:
        with connection.execute_wrapper(savepoint):
            result = json_value(action(ctx))
        fault("after-action")
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise StepTimeout(f"took {elapsed:.2f} s, past its timeout of {timeout:g} s")
    except Exception as exc:  # an action's failure is data, never a crash of the worker
        if lock_conflict(exc):
            raise
        if savepoint.id is not None:
            # a failed statement of the action marked the transaction for rollback;
            # the savepoint, taken before its first statement, undoes all of it
            connection.needs_rollback = False
            transaction.savepoint_rollback(savepoint.id)
        return None, _error(exc, retry)
    if savepoint.id is not None:
        transaction.savepoint_commit(savepoint.id)
    return result, None


LOCK_CONFLICTS = frozenset({"40P01", "40001", "55P03"})  # deadlock, serialization, lock n/a


SQLITE_LOCKED = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})  # "database is locked"


def lock_conflict(exc: BaseException) -> bool:
    """A database error that says another transaction was in the way (worth a retry)."""
    cause = exc.__cause__ if isinstance(exc, DatabaseError) else None
    return (
        getattr(cause, "sqlstate", None) in LOCK_CONFLICTS
        or getattr(cause, "sqlite_errorname", None) in SQLITE_LOCKED
    )


class _LazySavepoint:
    """An execute wrapper that takes a savepoint before the first statement it sees."""

    def __init__(self) -> None:
        self.id: str | None = None
        self._taking = False

    def __call__(self, execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
        if self.id is None and not self._taking:
            self._taking = True  # the SAVEPOINT statement passes through here too
            try:
                self.id = transaction.savepoint()
            finally:
                self._taking = False
        return execute(sql, params, many, context)


def _error(exc: BaseException, retry: RetryPolicy) -> dict[str, Any]:
    if isinstance(exc, StepTimeout):
        return {"type": "timeout", "message": str(exc)[:4000], "retryable": True}
    kind = exc.type if isinstance(exc, StepFailed) else type(exc).__name__
    return {"type": kind[:200], "message": str(exc)[:4000], "retryable": retry.retryable(exc)}


def _context(run: SagaRun, step: StepRun, phase: str, attempt: int) -> StepContext:
    return StepContext.build(
        saga_id=run.saga_id,
        saga_type=run.saga_type,
        step=step.name,
        phase=phase,
        attempt=attempt,
        epoch=run.epoch,
        data=run.data,
        results=run.results,
    )


def _failed(
    run: SagaRun,
    steps: list[StepRun],
    spec: Step,
    step: StepRun,
    tel: Telemetry,
    now: datetime,
    error: dict[str, Any],
    *,
    timed_out: bool = False,
) -> bool:
    step.status = StepRunStatus.FAILED
    step.ended_at = now
    step.last_error = error
    step.command_id = ""
    run.last_error = {**error, "step": step.name}
    tel.add(
        "step.timed_out" if timed_out else "step.failed",
        now,
        step=step.name,
        attempt=step.attempt,
        error=error,
        idempotency_key=idempotency_key(run.saga_id, step.name, run.epoch),
    )
    if error.get("retryable") and step.attempt - step.attempt_base < spec.retry.max_attempts:
        run.next_run_at = now + spec.retry.delay(step.attempt)
        run.waiting = f"retry {step.attempt + 1} of {step.name} at {run.next_run_at:%H:%M:%S}"
        return False
    return compensation_begin(run, steps, tel, now)


def compensation_needed(run: SagaRun, steps: list[StepRun]) -> bool:
    definition = definition_get(run.saga_type)
    return any(_undoable(definition.step(s.name), s) for s in steps)


def compensation_begin(run: SagaRun, steps: list[StepRun], tel: Telemetry, now: datetime) -> bool:
    """Start undoing the completed steps, or end ``failed`` when there is nothing to undo."""
    if compensation_needed(run, steps):
        run.status = RunStatus.COMPENSATING
        run.next_run_at = now
        run.waiting = ""
        tel.add("saga.compensating", now)
        return True
    run.status = RunStatus.FAILED
    run.ended_at = now
    run.next_run_at = None
    run.waiting = ""
    tel.add("saga.failed", now, error=_saga_error(run))
    return False


def _saga_error(run: SagaRun) -> dict[str, Any] | None:
    if not run.last_error:
        return None
    return {k: run.last_error[k] for k in ("type", "message", "retryable") if k in run.last_error}


def _undoable(spec: Step, step: StepRun) -> bool:
    if step.status == StepRunStatus.COMPENSATING:
        return True
    if step.status == StepRunStatus.FAILED and spec.kind == "remote":
        # its command went out and nobody knows whether the service did the work
        # (no answer in time, or abandoned by an operator): undo it to be sure
        return (step.last_error or {}).get("type") in ("timeout", "cancelled")
    if step.status != StepRunStatus.SUCCEEDED:
        return False
    return spec.has_compensation or step.tx_state == "prepared"


def _backward(
    run: SagaRun, definition: SagaDefinition, steps: list[StepRun], tel: Telemetry, now: datetime
) -> bool:
    target = next(
        (s for s in reversed(steps) if _undoable(definition.step(s.name), s)),
        None,
    )
    if target is None:
        run.status = RunStatus.COMPENSATED
        run.ended_at = now
        run.next_run_at = None
        run.waiting = ""
        tel.add("saga.compensated", now)
        return False
    spec = definition.step(target.name)
    if target.status == StepRunStatus.COMPENSATING and target.command_id:  # undo command out
        if target.deadline is not None and now >= target.deadline:
            circuit.record(spec.service, ok=False, now=now)
            return _undo_failed(run, spec, target, tel, now, _timeout_error(spec))
        run.next_run_at = target.deadline
        return False
    if spec.kind == "remote":
        return _send(run, spec, target, tel, now, phase="compensation")
    target.compensation_attempt += 1
    target.status = StepRunStatus.COMPENSATING
    tel.add("compensation.started", now, step=target.name, attempt=target.compensation_attempt)
    if spec.compensation is None:  # a tcc step without a cancel action: nothing to run
        return _undone(run, spec, target, tel, now)
    ctx = _context(run, target, "compensation", target.compensation_attempt)
    _, error = _call(spec.compensation, ctx, spec.timeout, spec.undo_retry)
    end = timezone.now()
    if error is not None:
        return _undo_failed(run, spec, target, tel, end, error)
    return _undone(run, spec, target, tel, end)


def _undone(run: SagaRun, spec: Step, step: StepRun, tel: Telemetry, now: datetime) -> bool:
    step.status = StepRunStatus.COMPENSATED
    step.command_id = ""
    step.ended_at = now
    tel.add("compensation.succeeded", now, step=step.name, attempt=step.compensation_attempt)
    if step.tx_state == "prepared":
        step.tx_state = "rolled_back"
        tel.add("tx.rolled_back", now, step=step.name)
    run.next_run_at = now
    run.waiting = ""
    return True


def _undo_failed(
    run: SagaRun, spec: Step, step: StepRun, tel: Telemetry, now: datetime, error: dict[str, Any]
) -> bool:
    step.last_error = error
    step.command_id = ""
    run.last_error = {**error, "step": step.name}
    tel.add(
        "compensation.failed", now, step=step.name, attempt=step.compensation_attempt, error=error
    )
    budget = spec.undo_retry.max_attempts
    if error.get("retryable") and step.compensation_attempt - step.compensation_base < budget:
        run.next_run_at = now + spec.undo_retry.delay(step.compensation_attempt)
        run.waiting = (
            f"retry {step.compensation_attempt + 1} of undoing {step.name} "
            f"at {run.next_run_at:%H:%M:%S}"
        )
        return False
    step.status = StepRunStatus.COMPENSATION_FAILED
    run.status = RunStatus.COMPENSATION_FAILED
    run.ended_at = now
    run.next_run_at = None
    run.waiting = ""
    tel.add("saga.compensation_failed", now, error=_saga_error(run))
    return False


def _confirm(run: SagaRun, spec: Step, step: StepRun, tel: Telemetry, now: datetime) -> bool:
    """Commit a prepared tcc participant once the whole saga succeeded."""
    if spec.confirm is not None:
        ctx = _context(run, step, "confirm", 1)
        _, error = _call(spec.confirm, ctx, spec.timeout, spec.retry)
        if error is not None:
            run.last_error = {**error, "step": step.name}
            run.next_run_at = now + spec.retry.delay(1)
            run.waiting = f"confirm of {step.name} failed; retry at {run.next_run_at:%H:%M:%S}"
            return False
    step.tx_state = "committed"
    tel.add("tx.committed", timezone.now(), step=step.name)
    run.next_run_at = now
    return True


# -- remote steps ---------------------------------------------------------------


def _send(
    run: SagaRun, spec: Step, step: StepRun, tel: Telemetry, now: datetime, *, phase: str
) -> bool:
    """Send the step's command (or its undo) through the outbox; wait for the reply."""
    allowed, retry_at = circuit.allow(spec.service, now=now)
    if not allowed:
        run.next_run_at = retry_at
        run.waiting = f"waiting: circuit open for {spec.service} until {retry_at:%H:%M:%S}"
        return False
    forward = phase == "forward"
    key = idempotency_key(run.saga_id, step.name, run.epoch)
    if forward:
        step.attempt += 1
        step.epoch = run.epoch
        step.status = StepRunStatus.RUNNING
        step.started_at = now
        attempt = step.attempt
    else:
        step.compensation_attempt += 1
        step.status = StepRunStatus.COMPENSATING
        attempt = step.compensation_attempt
    step.command_id = uuid.uuid4().hex
    step.deadline = now + timedelta(seconds=spec.timeout)
    action = spec.command if forward else spec.undo_action
    tel.add(
        "step.started" if forward else "compensation.started",
        now,
        step=step.name,
        attempt=attempt,
        idempotency_key=key,
        attributes={"command_id": step.command_id},
    )
    outbox.publish(
        topic=COMMANDS_TOPIC,
        key=run.saga_id,
        type=f"{spec.service}.{action}",
        payload={
            "command_id": step.command_id,
            "action": action,
            "saga_id": run.saga_id,
            "saga_type": run.saga_type,
            "step": step.name,
            "attempt": attempt,
            "idempotency_key": key,
            "epoch": run.epoch,
            "reason": "",
            "requested_by": "orchestrator",
            "requested_at": now.isoformat(),
            "data": run.data,
            "results": run.results,
            "reply_to": REPLIES_TOPIC,
        },
    )
    circuit.sent(spec.service, step.command_id)
    run.next_run_at = step.deadline
    run.waiting = f"waiting for {spec.service} to answer {action}"
    return False


def step_reply(
    *,
    command_id: str,
    ok: bool,
    result: Any = None,
    error: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """A service answered a command. False when nobody waits for it (late, duplicate, unknown).

    Fencing: the step must still be waiting for exactly this command id (a
    reply to an earlier attempt or epoch names another one).
    """
    if not command_id:
        return False
    run_pk = StepRun.objects.filter(command_id=command_id).values_list("run_id", flat=True).first()
    if run_pk is None:
        return False
    with transaction.atomic():
        run = SagaRun.objects.select_for_update().get(pk=run_pk)
        steps = list(StepRun.objects.filter(run=run).order_by("position"))
        before = steps_snapshot(steps)
        step = next((s for s in steps if s.command_id == command_id), None)
        if step is None or run.is_terminal:
            return False
        now = now or timezone.now()
        definition = definition_get(run.saga_type)
        spec = definition.step(step.name)
        tel = Telemetry(run, definition.service)
        circuit.record(spec.service, ok=ok, now=now, command_id=command_id)
        error = _reply_error(error) if not ok else None
        if step.status == StepRunStatus.RUNNING:
            if ok:
                try:
                    value = json_value(result)
                except TypeError:
                    value = None
                step.status = StepRunStatus.SUCCEEDED
                step.ended_at = now
                step.last_error = None
                step.command_id = ""
                if value is not None:
                    run.results = {**run.results, step.name: value}
                tel.add("step.succeeded", now, step=step.name, attempt=step.attempt)
                run.next_run_at = now
                run.waiting = ""
            else:
                assert error is not None
                _failed(run, steps, spec, step, tel, now, error)
        elif step.status == StepRunStatus.COMPENSATING:
            if ok:
                _undone(run, spec, step, tel, now)
            else:
                assert error is not None
                _undo_failed(run, spec, step, tel, now, error)
        else:
            return False
        transition_save(run, steps, before, tel)
    return True


def _reply_error(error: dict[str, Any] | None) -> dict[str, Any]:
    error = error or {}
    return {
        "type": str(error.get("type") or "remote_error")[:200],
        "message": str(error.get("message") or "")[:4000],
        "retryable": error.get("retryable", True) is not False,
    }
