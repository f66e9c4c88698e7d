"""Operator hooks on orchestrated sagas: the orchestrator's half of the operator actions.

Each hook locks the run, checks its state and the version the operator saw
(``expected_version``; :class:`Conflict` when it moved on, so a second click
on a stale page does nothing twice), changes the run in one transaction with
its telemetry, and leaves the work to the workers (``next_run_at``).

Which hook applies in which state: the table in docs/orchestrator.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from orchestrator.definitions import definition_get
from orchestrator.engine import (
    DONE,
    compensation_begin,
    compensation_needed,
    json_value,
    steps_snapshot,
    transition_save,
)
from orchestrator.models import RunStatus, SagaRun, StepRun, StepRunStatus
from orchestrator.reporting import Telemetry


class Refused(Exception):
    """The hook does not apply to the run as it is (the reason says why)."""

    def __init__(self, reason: str, *, field: str = "status") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class Conflict(Refused):
    """The run changed since the operator looked (``expected_version`` is stale)."""


@dataclass(frozen=True, slots=True)
class HookResult:
    saga_id: str
    version: int
    status: str


Change = Callable[[SagaRun, list[StepRun], Telemetry], None]


def _hook(saga_id: str, expected_version: int | None, change: Change) -> HookResult:
    with transaction.atomic():
        run = SagaRun.objects.select_for_update().filter(saga_id=saga_id).first()
        if run is None:
            raise Refused(f"no orchestrated saga {saga_id}", field="saga_id")
        if expected_version is not None and run.version != expected_version:
            raise Conflict(
                f"the saga changed since you looked (version {expected_version}, "
                f"now {run.version})",
                field="version",
            )
        steps = list(StepRun.objects.filter(run=run).order_by("position"))
        before = steps_snapshot(steps)
        tel = Telemetry(run, definition_get(run.saga_type).service)
        change(run, steps, tel)
        transition_save(run, steps, before, tel)
        return HookResult(run.saga_id, run.version, run.status)


def _need(run: SagaRun, allowed: Collection[str], what: str, *, paused_ok: bool = True) -> None:
    if run.status not in allowed:
        raise Refused(f"cannot {what} a saga that is {run.status}")
    if run.paused and not paused_ok:
        raise Refused(f"cannot {what} a paused saga: resume it first")


def _current(steps: list[StepRun]) -> StepRun | None:
    return next((s for s in steps if s.status not in DONE), None)


def _wake(run: SagaRun) -> None:
    run.next_run_at = timezone.now()
    run.waiting = ""
    run.lease_owner, run.lease_until = "", None  # a worker holding it must not write again


def _named(steps: list[StepRun], named: str, what: str) -> StepRun:
    """The current step, which must be the one the operator named (when they named one)."""
    step = _current(steps)
    if step is None or step.status not in (StepRunStatus.FAILED, StepRunStatus.RUNNING):
        raise Refused(f"no step has failed or is waiting: nothing to {what}", field="step")
    if named and named != step.name:
        raise Refused(f"the step to {what} now is {step.name}, not {named}", field="step")
    return step


def run_retry_step(
    *, saga_id: str, step: str = "", expected_version: int | None = None
) -> HookResult:
    named = step

    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        _need(run, {RunStatus.RUNNING}, "retry a step of")
        step = _named(steps, named, "retry")
        run.epoch += 1
        step.status = StepRunStatus.PENDING
        step.attempt_base = step.attempt  # attempt numbers go on; the budget starts again
        step.command_id = ""
        step.deadline = None
        run.paused = False
        _wake(run)

    return _hook(saga_id, expected_version, change)


def run_retry_compensation(*, saga_id: str, expected_version: int | None = None) -> HookResult:
    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        _need(run, {RunStatus.COMPENSATION_FAILED}, "retry the compensation of")
        failed = [s for s in steps if s.status == StepRunStatus.COMPENSATION_FAILED]
        if not failed:
            raise Refused("no compensation has failed", field="step")
        run.epoch += 1
        for step in failed:
            step.status = StepRunStatus.COMPENSATING
            step.compensation_base = step.compensation_attempt
            step.command_id = ""
        run.status = RunStatus.COMPENSATING
        run.ended_at = None
        tel.add("saga.compensating", timezone.now())
        _wake(run)

    return _hook(saga_id, expected_version, change)


def run_compensate(
    *, saga_id: str, expected_version: int | None = None, cancel: bool = False
) -> HookResult:
    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        allowed = {RunStatus.RUNNING} if cancel else {RunStatus.RUNNING, RunStatus.FAILED}
        _need(run, allowed, "cancel" if cancel else "compensate")
        now = timezone.now()
        for step in steps:  # a command still out is abandoned: its reply will be ignored
            if step.status == StepRunStatus.RUNNING:
                step.status = StepRunStatus.FAILED
                step.command_id = ""
                step.last_error = {"type": "cancelled", "message": "", "retryable": False}
        run.paused = False
        run.last_error = {
            "type": "cancelled" if cancel else "compensated_by_operator",
            "message": "",
            "retryable": False,
        }
        run.ended_at = None
        run.lease_owner, run.lease_until = "", None
        if cancel and not compensation_needed(run, steps):
            _stop(run, tel, now, "cancelled", "cancelled by an operator; nothing to undo")
            return
        compensation_begin(run, steps, tel, now)

    return _hook(saga_id, expected_version, change)


def run_skip_step(
    *, saga_id: str, step: str = "", expected_version: int | None = None
) -> HookResult:
    named = step

    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        _need(run, {RunStatus.RUNNING}, "skip a step of")
        step = _named(steps, named, "skip")
        now = timezone.now()
        step.status = StepRunStatus.SKIPPED
        step.command_id = ""
        step.ended_at = now
        tel.add(
            "step.succeeded",
            now,
            step=step.name,
            attempt=max(step.attempt, 1),
            attributes={"skipped": True},
        )
        _wake(run)

    return _hook(saga_id, expected_version, change)


def run_pause(*, saga_id: str, expected_version: int | None = None) -> HookResult:
    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        _need(run, {RunStatus.RUNNING, RunStatus.COMPENSATING}, "pause", paused_ok=False)
        run.paused = True
        run.waiting = "paused by an operator"
        run.lease_owner, run.lease_until = "", None

    return _hook(saga_id, expected_version, change)


def run_resume(*, saga_id: str, expected_version: int | None = None) -> HookResult:
    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        if not run.paused:
            raise Refused("the saga is not paused")
        run.paused = False
        _wake(run)

    return _hook(saga_id, expected_version, change)


def run_terminate(*, saga_id: str, expected_version: int | None = None) -> HookResult:
    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        if run.is_terminal:
            raise Refused(f"the saga is {run.status} already")
        for step in steps:
            step.command_id = ""
        _stop(run, tel, timezone.now(), "terminated", "stopped by an operator")

    return _hook(saga_id, expected_version, change)


def _stop(run: SagaRun, tel: Telemetry, now: Any, kind: str, message: str) -> None:
    """End the run here, nothing (more) compensated: reported ``saga.cancelled``."""
    run.status = RunStatus.TERMINATED
    run.paused = False
    run.ended_at = now
    run.next_run_at = None
    run.waiting = ""
    run.lease_owner, run.lease_until = "", None
    tel.add("saga.cancelled", now, error={"type": kind, "message": message, "retryable": False})


def run_rerun_from(
    *,
    saga_id: str,
    step: str,
    data: dict[str, Any] | None = None,
    expected_version: int | None = None,
) -> HookResult:
    def change(run: SagaRun, steps: list[StepRun], tel: Telemetry) -> None:
        _need(run, {RunStatus.RUNNING}, "rerun")
        names = [s.name for s in steps]
        if step not in names:
            raise Refused(f"no step {step!r}; steps: {', '.join(names)}", field="step")
        if data is not None:
            if not isinstance(data, dict):
                raise Refused("a JSON object", field="data")
            try:
                run.data = json_value(data)
            except TypeError as exc:
                raise Refused(str(exc), field="data") from None
        run.epoch += 1
        for s in steps[names.index(step) :]:
            s.status = StepRunStatus.PENDING
            s.attempt_base = s.attempt
            s.command_id = ""
            s.deadline = None
            run.results.pop(s.name, None)
        run.paused = False
        _wake(run)

    return _hook(saga_id, expected_version, change)
