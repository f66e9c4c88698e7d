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
Lock order: the run row, then tracking's rows (through the reporter).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from django.conf import settings
from django.db import IntegrityError, transaction
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
from orchestrator.reporting import Telemetry
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
    if not saga_id or len(saga_id) > 200:
        raise StartRefused("saga_id", "1 to 200 characters")
    if data is not None and not isinstance(data, dict):
        raise StartRefused("data", "a JSON object")
    try:
        clean = json_value(data or {})
    except TypeError as exc:
        raise StartRefused("data", str(exc)) from None
    # The saga's trace: the caller's, or (tracing on, no caller's) one of its own.
    with telemetry.span("saga start", saga_id=saga_id, saga_type=saga_type):
        return _start(definition, saga_type, saga_id, clean)


def _start(definition: Any, saga_type: str, saga_id: str, clean: dict[str, Any]) -> SagaRun:
    now = timezone.now()
    with transaction.atomic():
        existing = SagaRun.objects.filter(saga_id=saga_id).first()
        if existing is None:
            try:
                with transaction.atomic():
                    run = SagaRun.objects.create(
                        saga_id=saga_id,
                        saga_type=saga_type,
                        data=clean,
                        next_run_at=now,
                        created_at=now,
                        updated_at=now,
                        traceparent=telemetry.traceparent(),
                    )
            except IntegrityError:  # a concurrent start won
                existing = SagaRun.objects.get(saga_id=saga_id)
            else:
                StepRun.objects.bulk_create(
                    StepRun(run=run, name=s.name, position=i, kind=s.kind)
                    for i, s in enumerate(definition.steps)
                )
                tel = Telemetry(run, definition.service)
                tel.add("saga.started", now, attributes=_attributes(clean))
                run.save(update_fields=["report_seq"])
                tel.send()
                return run
        if existing.saga_type != saga_type:
            raise StartRefused("saga_id", f"already used by a saga of type {existing.saga_type}")
        return existing


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
    with transaction.atomic(durable=True):
        run = SagaRun.objects.select_for_update().filter(pk=claim.pk).first()
        if run is None or run.lease_token != claim.token or run.lease_owner != claim.owner:
            return False  # fenced: the lease went to another worker
        now = now or timezone.now()
        if run.is_terminal or run.paused or (run.next_run_at and run.next_run_at > now):
            return False
        definition = definition_get(run.saga_type)
        steps = list(StepRun.objects.filter(run=run).order_by("position"))
        before = steps_snapshot(steps)
        with (
            telemetry.continued({"traceparent": run.traceparent}),
            telemetry.span("orchestrator transition", saga_id=run.saga_id, saga_type=run.saga_type),
        ):
            tel = Telemetry(run, definition.service)
            again = _transition(run, definition, steps, tel, now)
            run.lease_until = timezone.now() + _lease()  # still working on it
            transition_save(run, steps, before, tel)
        fault("after-transition-before-commit")
    fault("after-transition")
    return again and not run.is_terminal


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


def steps_snapshot(steps: list[StepRun]) -> dict[int, tuple[Any, ...]]:
    return {s.pk: tuple(getattr(s, f) for f in STEP_FIELDS) for s in steps}


def transition_save(
    run: SagaRun, steps: list[StepRun], before: dict[int, tuple[Any, ...]], tel: Telemetry
) -> None:
    """Write the run, the steps the transition changed (usually one), then report."""
    run.version += 1
    run.updated_at = timezone.now()
    run.save()
    for step in steps:
        values = tuple(getattr(step, f) for f in STEP_FIELDS)
        if values != before[step.pk]:
            StepRun.objects.filter(pk=step.pk).update(**dict(zip(STEP_FIELDS, values, strict=True)))
    tel.send()


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
    """(result, None) or (None, error); the action's writes roll back when it fails."""
    savepoint = transaction.savepoint()
    started = time.monotonic()
    try:
        result = json_value(action(ctx))
        fault("after-action")
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise StepTimeout(f"took {elapsed:.2f} s, past its timeout of {timeout:g} s")
    except Exception as exc:  # an action's failure is data, never a crash of the worker
        transaction.savepoint_rollback(savepoint)
        return None, _error(exc, retry)
    transaction.savepoint_commit(savepoint)
    return result, None


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
