"""Operator actions: one class per action with ``check()`` and ``execute()`` (STYLE.md).

The dashboard, the REST API and ``manage.py saga_action`` all call
:func:`saga_action_run`, which in one transaction: locks the saga (the
orchestrator's run first when it has one: the order its workers lock in),
checks role, version and state, dispatches — to the orchestrator's hooks for
sagas it runs, else as a command message through the outbox to the owning
service — bumps the saga's version (so a second operator acting on what they
saw gets 409) and writes the audit record. A refusal is audited too, in its
own transaction.

Progress of a dispatched command (requested → dispatched → acknowledged →
done or failed) follows the service's telemetry naming the command id
(:func:`action_progress`); no answer within ``ACTION_TIMEOUT_SECONDS`` marks
it ``timed_out`` (:func:`actions_overdue_mark`, run by the detector loop).
The state/action table is in docs/operations.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

import outbox
from orchestrator import hooks
from orchestrator.context import idempotency_key
from orchestrator.engine import COMMANDS_TOPIC
from orchestrator.models import SagaRun
from sagaadmin import telemetry
from tracking.detection import FAILED_STEP
from tracking.live import notify_sagas_changed
from tracking.models import (
    TERMINAL_SAGA_STATUSES,
    ActionStatus,
    AuditEntry,
    OperatorAction,
    Saga,
    SagaStatus,
    Step,
    TelemetryEvent,
)
from tracking.protocol import REDACTED
from tracking.roles import user_role

REASON_MAX = 2000


class ActionError(Exception):
    """Refused: ``status`` is the HTTP status the API answers, ``field`` what is wrong."""

    def __init__(self, status: int, field: str, message: str, **extra: Any) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message
        self.extra = extra


@dataclass(frozen=True, slots=True)
class ActionInput:
    action: str
    saga_id: str
    actor: Any  # the user
    reason: str
    expected_version: int | None
    step: str = ""
    data: dict[str, Any] | None = None
    request_id: str | None = None


@dataclass(slots=True)
class Target:
    """The locked saga (and its orchestrator run, when it has one)."""

    saga: Saga
    run: SagaRun | None
    steps: dict[str, Step] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.saga.status,
            "version": self.saga.version,
            "current_step": self.saga.current_step,
        }
        if self.run is not None:
            out["run"] = {"status": self.run.status, "paused": self.run.paused}
        return out


class Action:
    """Base: ``check()`` raises :class:`ActionError` when not allowed; ``execute()`` dispatches."""

    name: ClassVar[str]
    label: ClassVar[str]
    permission: ClassVar[str] = "tracking.act_on_saga"
    needs_step: ClassVar[bool] = False
    orchestrated_only: ClassVar[bool] = False
    # The saga statuses it applies in (None: any), and the verb for the refusal.
    statuses: ClassVar[tuple[str, ...] | None] = None
    verb: ClassVar[str] = ""

    def check(self, target: Target, inp: ActionInput) -> None:
        """Orchestrated-only, then the saga's status, then the step, then ``allowed()``."""
        if self.orchestrated_only and target.run is None:
            raise ActionError(409, "action", f"{self.name} is for orchestrated sagas only")
        if self.statuses is not None:
            _refuse(target.saga.status, self.statuses, self.verb)
        if self.needs_step:
            step = inp.step or target.saga.current_step or self._failed_step(target)
            if not step or step not in target.steps:
                raise ActionError(400, "step", "name the step (it must be one of the saga's)")
        self.allowed(target, inp)

    def allowed(self, target: Target, inp: ActionInput) -> None:
        """More of the state rule (docs/operations.md); raise ActionError(409, ...)."""

    @staticmethod
    def _failed_step(target: Target) -> str:
        failed = [s for s in target.steps.values() if s.status in FAILED_STEP]
        return failed[-1].name if failed else ""

    def step_of(self, target: Target, inp: ActionInput) -> str:
        if not self.needs_step:
            return ""
        return inp.step or self._failed_step(target) or target.saga.current_step

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any] | None:
        """For orchestrated sagas: the orchestrator hook that carries it out."""
        return None

    def execute(self, target: Target, inp: ActionInput, record: OperatorAction) -> None:
        """Dispatch (inside the action's transaction)."""
        now = timezone.now()
        record.dispatched_at = now
        if target.run is not None:
            run_hook = self.hook(target, inp)
            assert run_hook is not None
            try:
                run_hook()
            except hooks.Refused as exc:
                raise ActionError(409, exc.field, exc.reason) from None
            except LookupError as exc:  # e.g. a saga type this process does not define
                raise ActionError(409, "saga_type", str(exc)) from None
            record.orchestrated = True
            record.status = ActionStatus.DONE
            record.finished_at = now
            return
        _command_send(target, inp, record, self.name, now)


def _orchestrated_running(target: Target, what: str) -> None:
    """The orchestrator retries and skips steps of running runs only (a failed run:
    compensate or restart it)."""
    if target.run is not None and target.run.status != "running":
        raise ActionError(
            409, "status", f"cannot {what} an orchestrated saga that is {target.run.status}"
        )


def _refuse(status: str, allowed: tuple[str, ...], what: str) -> None:
    if status not in allowed:
        raise ActionError(
            409, "status", f"cannot {what} a saga that is {status} (allowed: {', '.join(allowed)})"
        )


class RetryStep(Action):
    name, label, needs_step = "retry_step", "Retry step", True
    statuses, verb = (SagaStatus.RUNNING, SagaStatus.FAILED), "retry a step of"

    def allowed(self, target: Target, inp: ActionInput) -> None:
        _orchestrated_running(target, "retry a step of")
        step = target.steps[self.step_of(target, inp)]
        if target.run is None and step.status not in FAILED_STEP:
            raise ActionError(409, "step", f"step {step.name} is {step.status}, not failed")

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        step = inp.step
        return lambda: hooks.run_retry_step(saga_id=target.saga.saga_id, step=step)


class RetryCompensation(Action):
    name, label = "retry_compensation", "Retry compensation"
    statuses, verb = (SagaStatus.COMPENSATION_FAILED,), "retry the compensation of"

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        return lambda: hooks.run_retry_compensation(saga_id=target.saga.saga_id)


class Compensate(Action):
    name, label = "compensate", "Compensate"
    statuses, verb = (SagaStatus.RUNNING, SagaStatus.FAILED), "compensate"

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        return lambda: hooks.run_compensate(saga_id=target.saga.saga_id)


class SkipStep(Action):
    name, label, needs_step = "skip_step", "Skip step", True
    statuses, verb = (SagaStatus.RUNNING, SagaStatus.FAILED), "skip a step of"

    def allowed(self, target: Target, inp: ActionInput) -> None:
        _orchestrated_running(target, "skip a step of")

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        step = inp.step
        return lambda: hooks.run_skip_step(saga_id=target.saga.saga_id, step=step)


class Cancel(Action):
    name, label = "cancel", "Cancel"
    statuses, verb = (SagaStatus.RUNNING,), "cancel"

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        return lambda: hooks.run_compensate(saga_id=target.saga.saga_id, cancel=True)


class Terminate(Action):
    name, label = "terminate", "Terminate"
    permission = "tracking.terminate_saga"

    def allowed(self, target: Target, inp: ActionInput) -> None:
        if target.saga.status in TERMINAL_SAGA_STATUSES:
            raise ActionError(409, "status", f"the saga is {target.saga.status} already")

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        return lambda: hooks.run_terminate(saga_id=target.saga.saga_id)


class Pause(Action):
    name, label, orchestrated_only = "pause", "Pause", True
    statuses, verb = (SagaStatus.RUNNING, SagaStatus.COMPENSATING), "pause"

    def allowed(self, target: Target, inp: ActionInput) -> None:
        if target.run is not None and target.run.paused:
            raise ActionError(409, "status", "the saga is paused already")

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        return lambda: hooks.run_pause(saga_id=target.saga.saga_id)


class Resume(Action):
    name, label, orchestrated_only = "resume", "Resume", True

    def allowed(self, target: Target, inp: ActionInput) -> None:
        if target.run is not None and not target.run.paused:
            raise ActionError(409, "status", "the saga is not paused")

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        return lambda: hooks.run_resume(saga_id=target.saga.saga_id)


class Rerun(Action):
    """Rerun from a step, optionally with edited data (editing data needs an admin)."""

    name, label, needs_step, orchestrated_only = "rerun", "Rerun from step", True, True
    statuses, verb = (SagaStatus.RUNNING,), "rerun"

    def check(self, target: Target, inp: ActionInput) -> None:
        if inp.data is not None and not inp.actor.has_perm("tracking.terminate_saga"):
            raise ActionError(403, "data", "only admins edit a saga's data")
        super().check(target, inp)

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        step = self.step_of(target, inp)
        data = inp.data
        if data is not None and target.run is not None:
            data = unredacted(data, target.run.data)
        return lambda: hooks.run_rerun_from(saga_id=target.saga.saga_id, step=step, data=data)


def unredacted(edited: Any, stored: Any) -> Any:
    """Edited data with the redaction marker put back to the stored value it stands for
    (pages and the API show secrets as ``[redacted]``; editing must not overwrite them)."""
    if edited == REDACTED:
        return stored
    if isinstance(edited, dict) and isinstance(stored, dict):
        return {k: unredacted(v, stored.get(k)) if k in stored else v for k, v in edited.items()}
    return edited


class Restart(Action):
    """A new saga with the same input, linked to this one (orchestrated sagas)."""

    name, label, orchestrated_only = "restart", "Restart as a new saga", True

    def allowed(self, target: Target, inp: ActionInput) -> None:
        if target.saga.status not in TERMINAL_SAGA_STATUSES:
            raise ActionError(409, "status", "only a finished saga is restarted")

    def hook(self, target: Target, inp: ActionInput) -> Callable[[], Any]:
        from orchestrator.engine import saga_start

        run = target.run
        assert run is not None
        new_id = f"{run.saga_id}~{uuid.uuid4().hex[:6]}"[-200:]
        data = {**run.data, "restarted_from": run.saga_id}
        return lambda: saga_start(saga_type=run.saga_type, saga_id=new_id, data=data)


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        RetryStep(),
        RetryCompensation(),
        Compensate(),
        SkipStep(),
        Cancel(),
        Terminate(),
        Pause(),
        Resume(),
        Rerun(),
        Restart(),
    )
}


def _owner(target: Target, step: str) -> str:
    """Which service a command goes to: the step's, else the one that started the saga."""
    if step and step in target.steps and target.steps[step].service:
        return target.steps[step].service
    started = (
        TelemetryEvent.objects.filter(saga_id=target.saga.saga_id, type="saga.started")
        .values_list("service__name", flat=True)
        .first()
    )
    return started or (target.saga.service_list[:1] or [""])[0]


def _command_send(
    target: Target, inp: ActionInput, record: OperatorAction, action: str, now: datetime
) -> None:
    step = ACTIONS[action].step_of(target, inp)
    service = _owner(target, step)
    if not service:
        raise ActionError(409, "service", "no service reported this saga: nobody to command")
    epoch = OperatorAction.objects.filter(saga_id=target.saga.saga_id, action=action).count() + 1
    record.command_id = uuid.uuid4().hex
    record.service = service
    record.status = ActionStatus.DISPATCHED
    record.deadline = now + timedelta(seconds=settings.SAGAADMIN["ACTION_TIMEOUT_SECONDS"])
    attempt = target.steps[step].attempt + 1 if step in target.steps else 1
    outbox.publish(
        topic=COMMANDS_TOPIC,
        key=target.saga.saga_id,
        type=f"{service}.{action}",
        payload={
            "command_id": record.command_id,
            "action": action,
            "saga_id": target.saga.saga_id,
            "saga_type": target.saga.saga_type,
            "step": step,
            "attempt": attempt,
            "idempotency_key": idempotency_key(
                target.saga.saga_id, f"{step or '-'}:{action}", epoch
            ),
            "epoch": epoch,
            "reason": inp.reason,
            "requested_by": record.actor,
            "requested_at": now.isoformat(),
        },
    )


# -- running one ------------------------------------------------------------------


def saga_action_run(inp: ActionInput) -> dict[str, Any]:
    """Run one action; returns the answer (also stored for a resubmitted ``request_id``).

    Raises :class:`ActionError` (audited) when refused.
    """
    actor = getattr(inp.actor, "username", None)
    with telemetry.span(
        "operator action", action=inp.action, saga_id=inp.saga_id, step=inp.step or None,
        actor=actor,
    ):  # fmt: skip
        return _action_run(inp)


def _action_run(inp: ActionInput) -> dict[str, Any]:
    action = ACTIONS.get(inp.action)
    if action is None:
        raise ActionError(404, "action", f"no action {inp.action!r}; one of {', '.join(ACTIONS)}")
    reason = (inp.reason or "").strip()
    if not reason:
        raise ActionError(400, "reason", "say why (a reason is required)")
    if len(reason) > REASON_MAX:
        raise ActionError(400, "reason", f"at most {REASON_MAX} characters")
    if inp.request_id is not None and not 1 <= len(inp.request_id) <= 100:
        raise ActionError(400, "request_id", "1 to 100 characters")
    if inp.request_id:
        earlier = OperatorAction.objects.filter(request_id=inp.request_id).first()
        if earlier is not None:
            return _resubmitted(earlier, inp)
    try:
        return _run(action, inp, reason)
    except IntegrityError:  # the same request_id committed meanwhile
        earlier = OperatorAction.objects.filter(request_id=inp.request_id).first()
        if earlier is None:
            raise
        return _resubmitted(earlier, inp)


def _resubmitted(earlier: OperatorAction, inp: ActionInput) -> dict[str, Any]:
    if (earlier.action, earlier.saga_id) != (inp.action, inp.saga_id):
        raise ActionError(409, "request_id", "already used for another action")
    if earlier.status == ActionStatus.REFUSED:
        error = earlier.error or {}
        raise ActionError(
            int(error.get("status", 409)),
            str(error.get("field", "status")),
            str(error.get("message", "refused")),
        )
    return {**earlier.response, "resubmitted": True}


def _run(action: Action, inp: ActionInput, reason: str) -> dict[str, Any]:
    refusal: ActionError | None = None
    with transaction.atomic():
        target = _lock(inp.saga_id)
        before = target.state()
        record = OperatorAction(
            request_id=inp.request_id or None,
            action=action.name,
            saga_id=inp.saga_id,
            step="",
            actor=_name(inp.actor),
            reason=reason,
            data=inp.data,
            status=ActionStatus.REQUESTED,
        )
        try:
            if not inp.actor.has_perm(action.permission):
                raise ActionError(403, "role", f"your role may not {action.label.lower()}")
            if inp.expected_version is not None and inp.expected_version != target.saga.version:
                raise ActionError(
                    409,
                    "version",
                    f"the saga changed since you looked (you saw version {inp.expected_version},"
                    f" it is {target.saga.version} now)",
                    current_version=target.saga.version,
                )
            action.check(target, inp)
            record.step = action.step_of(target, inp)
            if action.name in _two_person() or (
                action.name == "rerun" and inp.data is not None and "rerun_data" in _two_person()
            ):
                record.status = ActionStatus.AWAITING_APPROVAL  # dispatched on approval
            else:
                with transaction.atomic():  # a refusal inside the dispatch rolls it back alone
                    action.execute(target, inp, record)
        except ActionError as exc:
            refusal = exc
        if refusal is None:
            target.saga.version = _bump(target.saga)
            record.response = {
                "action": action.name,
                "saga_id": inp.saga_id,
                "status": record.status,
                "command_id": record.command_id,
                "orchestrated": record.orchestrated,
                "version": target.saga.version,
            }
            record.save()
            record.response["id"] = record.pk
            record.save(update_fields=["response"])
            _audit(inp, action, record, before, _lock_state(inp.saga_id), outcome=record.status)
            return record.response
    # refused: audited in a transaction of its own (the action's rolled back)
    assert refusal is not None
    with transaction.atomic():
        record.status = ActionStatus.REFUSED
        record.error = {
            "status": refusal.status,
            "field": refusal.field,
            "message": refusal.message,
        }
        record.finished_at = timezone.now()
        record.save()
        outcome = {403: "forbidden", 409: "conflict"}.get(refusal.status, "refused")
        _audit(inp, action, record, before, before, outcome=outcome, detail=refusal.message)
    raise refusal


def _two_person() -> list[str]:
    return list(settings.SAGAADMIN["TWO_PERSON_ACTIONS"])


def action_approve(*, action_id: int, user: Any) -> dict[str, Any]:
    """The two-person rule: a second operator approves a waiting action; it is dispatched now.

    The state is checked again (not the version: the saga may have moved while it
    waited, and the approver sees it as it is now). A refusal is audited; the
    action stays waiting.
    """
    refusal: ActionError | None = None
    with transaction.atomic():
        record = _waiting(action_id)
        action = ACTIONS[record.action]
        inp = ActionInput(
            action=record.action,
            saga_id=record.saga_id,
            actor=user,
            reason=record.reason,
            expected_version=None,
            step=record.step,
            data=record.data,
        )
        target = _lock(record.saga_id)
        before = target.state()
        try:
            if record.actor == _name(user):
                raise ActionError(
                    403, "approver", "a second person must approve, not the requester"
                )
            if not user.has_perm(action.permission):
                raise ActionError(403, "role", f"your role may not {action.label.lower()}")
            action.check(target, inp)
            with transaction.atomic():
                action.execute(target, inp, record)
        except ActionError as exc:
            refusal = exc
        if refusal is None:
            record.approved_by = _name(user)
            version = _bump(target.saga)
            record.response = {
                **record.response,
                "status": record.status,
                "version": version,
                "command_id": record.command_id,
                "orchestrated": record.orchestrated,
            }
            record.save()
            _audit(inp, action, record, before, _lock_state(record.saga_id), outcome="approved")
            return record.response
    assert refusal is not None
    with transaction.atomic():
        outcome = {403: "forbidden", 409: "conflict"}.get(refusal.status, "refused")
        _audit(inp, action, record, before, before, outcome=outcome, detail=refusal.message)
    raise refusal


def action_reject(*, action_id: int, user: Any, note: str = "") -> dict[str, Any]:
    """A second operator turns a waiting action down; nothing is dispatched."""
    with transaction.atomic():
        record = _waiting(action_id)
        action = ACTIONS[record.action]
        if not user.has_perm(action.permission):
            raise ActionError(403, "role", f"your role may not {action.label.lower()}")
        record.status = ActionStatus.REJECTED
        record.finished_at = timezone.now()
        record.approved_by = _name(user)
        record.response = {**record.response, "status": record.status}
        record.save()
        state = _lock_state(record.saga_id)
        inp = ActionInput(record.action, record.saga_id, user, note or record.reason, None)
        _audit(inp, action, record, state, state, outcome="rejected", detail=note)
        return record.response


def _waiting(action_id: int) -> OperatorAction:
    record = OperatorAction.objects.select_for_update().filter(pk=action_id).first()
    if record is None:
        raise ActionError(404, "action_id", f"no action {action_id}")
    if record.status != ActionStatus.AWAITING_APPROVAL:
        raise ActionError(409, "status", f"the action is {record.status}, not awaiting approval")
    return record


def _lock(saga_id: str) -> Target:
    """Lock the orchestrator's run first (its workers' order), then the saga."""
    run = SagaRun.objects.select_for_update().filter(saga_id=saga_id).first()
    saga = Saga.objects.select_for_update().filter(saga_id=saga_id, event_count__gt=0).first()
    if saga is None:
        raise ActionError(404, "saga_id", f"no saga {saga_id}")
    steps = {s.name: s for s in Step.objects.filter(saga=saga)}
    return Target(saga, run, steps)


def _lock_state(saga_id: str) -> dict[str, Any]:
    return _lock(saga_id).state()


def _bump(saga: Saga) -> int:
    """One more version than now (the dispatch may have re-projected the saga already)."""
    Saga.objects.filter(pk=saga.pk).update(version=F("version") + 1)
    version = Saga.objects.filter(pk=saga.pk).values_list("version", flat=True).get()
    notify_sagas_changed(versions=[(saga.saga_id, version)])
    return version


def _name(user: Any) -> str:
    return str(getattr(user, "username", "") or user)


def _audit(
    inp: ActionInput,
    action: Action,
    record: OperatorAction,
    before: dict[str, Any],
    after: dict[str, Any],
    *,
    outcome: str,
    detail: str = "",
) -> None:
    AuditEntry.objects.create(
        actor=_name(inp.actor),
        role=user_role(inp.actor) or "",
        action=action.name,
        saga_id=inp.saga_id,
        step=record.step,
        reason=record.reason,
        outcome=outcome,
        detail=detail,
        state_before=before,
        state_after=after,
        operator_action=record,
    )


# -- progress ---------------------------------------------------------------------

_DONE_TYPES = ("succeeded", "completed", "compensated", "cancelled")
_FAILED_TYPES = ("failed", "timed_out", "compensation_failed")


def action_progress(*, command_id: str, event_type: str, error: Any = None) -> bool:
    """A service reported an event naming the command: acknowledged, done or failed."""
    record = OperatorAction.objects.filter(command_id=command_id).first()
    if record is None or record.status not in (ActionStatus.DISPATCHED, ActionStatus.ACKNOWLEDGED):
        return False
    now = timezone.now()
    outcome = event_type.rpartition(".")[2]
    if outcome in _DONE_TYPES:
        status, finished = ActionStatus.DONE, now
    elif outcome in _FAILED_TYPES:
        status, finished = ActionStatus.FAILED, now
    else:
        status, finished = ActionStatus.ACKNOWLEDGED, None
    changed = OperatorAction.objects.filter(
        pk=record.pk, status__in=[ActionStatus.DISPATCHED, ActionStatus.ACKNOWLEDGED]
    ).update(
        status=status,
        acknowledged_at=record.acknowledged_at or now,
        finished_at=finished,
        error=error if status == ActionStatus.FAILED else None,
    )
    return bool(changed)


def actions_overdue_mark(*, now: datetime | None = None) -> int:
    """Dispatched commands nobody answered in time become ``timed_out``."""
    return OperatorAction.objects.filter(
        status__in=[ActionStatus.DISPATCHED, ActionStatus.ACKNOWLEDGED],
        deadline__lt=now or timezone.now(),
    ).update(status=ActionStatus.TIMED_OUT, finished_at=now or timezone.now())


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether ``user`` may run an action on a saga now, and why not (for buttons)."""

    name: str
    label: str
    allowed: bool
    reason: str = ""  # why not, when not allowed
    needs_step: bool = False
    step: str = ""  # the step it would act on


def actions_available(*, saga_id: str, user: Any) -> list[Availability]:
    """Every action with its verdict for this saga and user (no locks, nothing written)."""
    saga = Saga.objects.filter(saga_id=saga_id, event_count__gt=0).first()
    if saga is None:
        return []
    target = Target(
        saga,
        SagaRun.objects.filter(saga_id=saga_id).first(),
        {s.name: s for s in Step.objects.filter(saga=saga)},
    )
    out = []
    for action in ACTIONS.values():
        inp = ActionInput(action.name, saga_id, user, "-", saga.version)
        why = ""
        if not user.has_perm(action.permission):
            why = f"your role may not {action.label.lower()}"
        else:
            try:
                action.check(target, inp)
            except ActionError as exc:
                why = exc.message
        step = ""
        if action.needs_step and not why:
            step = action.step_of(target, inp)
        out.append(Availability(action.name, action.label, not why, why, action.needs_step, step))
    return out
