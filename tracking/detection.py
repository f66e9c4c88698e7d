"""Detection rules: pure functions from a folded saga to findings (docs/detection.md).

Each rule reads :class:`Facts` (the folded state, its events in canonical
order, the thresholds, the time) and returns a :class:`Finding` or None.
Nothing here touches the database: the detector (tracking/detector.py) loads
the facts, runs :data:`RULES` and turns findings into incidents.

:func:`next_check` answers the other question the detector needs: when could
a rule that does not fire now fire without any new event? That time is stored
on the saga row (``watch_at``), so a pass reads only sagas that are due.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tracking.models import TERMINAL_SAGA_STATUSES, IncidentKind, SagaStatus, StepStatus
from tracking.policy import Policy, TypePolicy
from tracking.projection import FoldEvent, SagaState, StepState

ACTIVE_STEP = (StepStatus.RUNNING, StepStatus.COMPENSATING)
FAILED_STEP = (StepStatus.FAILED, StepStatus.TIMED_OUT)
# Saga states in which something is still undoing a failure.
COMPENSATING_SAGA = (
    SagaStatus.COMPENSATING,
    SagaStatus.COMPENSATED,
    SagaStatus.COMPENSATION_FAILED,
    SagaStatus.CANCELLED,
)


@dataclass(frozen=True, slots=True)
class Facts:
    state: SagaState
    events: Sequence[FoldEvent]  # canonical order (projection.order_events)
    policy: Policy
    now: datetime

    @property
    def thresholds(self) -> TypePolicy:
        return self.policy.for_type(self.state.saga_type)

    @property
    def terminal(self) -> bool:
        return self.state.status in TERMINAL_SAGA_STATUSES


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    reason: str
    evidence: tuple[FoldEvent, ...]
    step: str = ""

    def evidence_json(self) -> list[dict[str, Any]]:
        return [evidence_item(e) for e in self.evidence]


def evidence_item(e: FoldEvent) -> dict[str, Any]:
    return {
        "service": e.service,
        "event_id": e.event_id,
        "type": e.type,
        "step": e.step,
        "occurred_at": e.occurred_at.isoformat(),
    }


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _last(events: Sequence[FoldEvent], test: Callable[[FoldEvent], bool]) -> FoldEvent | None:
    return next((e for e in reversed(events) if test(e)), None)


def _last_of(events: Sequence[FoldEvent], step: str, types: tuple[str, ...]) -> FoldEvent | None:
    return next((e for e in reversed(events) if e.step == step and e.type in types), None)


def _step_clock(state: SagaState, step: StepState) -> datetime | None:
    """When a running step last showed life: its start or its latest heartbeat."""
    times = [t for t in (step.started_at, state.heartbeats.get(step.name)) if t is not None]
    return max(times) if times else None


# -- the rules ---------------------------------------------------------------


def stuck(f: Facts) -> Finding | None:
    """A non-terminal saga silent past its threshold, or a step past its bound or deadline."""
    state = f.state
    if f.terminal or state.last_received_at is None:
        return None
    limit = f.thresholds.stuck_after
    silent = f.now - state.last_received_at
    if silent > limit:
        last = f.events[-1:] if f.events else ()
        return Finding(
            IncidentKind.STUCK,
            f"no event for {_ago(silent)} (threshold {_ago(limit)})",
            tuple(last),
            state.current_step,
        )
    if state.deadline is not None and state.deadline < f.now:
        start = _last(f.events, lambda e: e.type == "saga.started")
        return Finding(
            IncidentKind.STUCK,
            f"past its deadline {_when(state.deadline)} and not finished",
            (start,) if start else tuple(f.events[-1:]),
        )
    for step in state.steps.values():
        if step.status not in ACTIVE_STEP:
            continue
        started = _last_of(f.events, step.name, ("step.started", "compensation.started"))
        evidence = (started,) if started else ()
        if step.deadline is not None and step.deadline < f.now:
            return Finding(
                IncidentKind.STUCK,
                f"step {step.name} past its deadline {_when(step.deadline)}",
                evidence,
                step.name,
            )
        bound = f.policy.step_bound(state.saga_type, step.name)
        clock = _step_clock(state, step)
        if bound is not None and clock is not None and f.now - clock > bound.limit:
            return Finding(
                IncidentKind.STUCK,
                f"step {step.name} running for {_ago(f.now - clock)} without progress, "
                f"past its bound of {bound.describe()}",
                evidence,
                step.name,
            )
    return None


def compensation_failed(f: Facts) -> Finding | None:
    """A compensation failed with no later success, or the saga said so itself."""
    failed_steps = [s for s in f.state.steps.values() if s.status == StepStatus.COMPENSATION_FAILED]
    reported = _last(f.events, lambda e: e.type == "saga.compensation_failed")
    if not failed_steps and (reported is None or f.state.status != SagaStatus.COMPENSATION_FAILED):
        return None
    evidence = [
        e for s in failed_steps if (e := _last_of(f.events, s.name, ("compensation.failed",)))
    ]
    if reported is not None and f.state.status == SagaStatus.COMPENSATION_FAILED:
        evidence.append(reported)
    names = ", ".join(s.name for s in failed_steps)
    reason = (
        f"compensation of {names} failed and has not succeeded on a retry"
        if failed_steps
        else "the saga reported saga.compensation_failed"
    )
    return Finding(
        IncidentKind.COMPENSATION_FAILED,
        reason,
        tuple(evidence),
        failed_steps[0].name if failed_steps else "",
    )


def retries_exhausted(f: Facts) -> Finding | None:
    """A step failed for good (not retryable, or out of attempts) and nothing compensates."""
    if f.state.status in COMPENSATING_SAGA:
        return None
    limit = f.thresholds.max_attempts
    for step in f.state.steps.values():
        if step.status not in FAILED_STEP:
            continue
        error = step.last_error or {}
        if error.get("retryable") is False:
            why = f"step {step.name} failed with a non-retryable error"
        elif step.attempt >= limit:
            why = f"step {step.name} failed {step.attempt} times (limit {limit})"
        else:
            continue
        failures = tuple(
            e
            for e in f.events
            if e.step == step.name and e.type in ("step.failed", "step.timed_out")
        )
        return Finding(
            IncidentKind.RETRIES_EXHAUSTED,
            f"{why} and nothing compensates",
            failures[-limit:],
            step.name,
        )
    return None


def in_doubt(f: Facts) -> Finding | None:
    """A participant prepared and neither committed nor rolled back within the timeout."""
    limit = f.thresholds.in_doubt_after
    late = [e for e in f.state.prepared.values() if f.now - e.occurred_at > limit]
    if not late:
        return None
    late.sort(key=lambda e: (e.occurred_at, e.service, e.step))
    who = ", ".join(f"{e.service}/{e.step}" if e.step else e.service for e in late)
    return Finding(
        IncidentKind.IN_DOUBT,
        f"{who} prepared {_ago(f.now - late[0].occurred_at)} ago; "
        f"no commit or rollback within {_ago(limit)}",
        tuple(late),
        late[0].step,
    )


def anomaly(f: Facts) -> Finding | None:
    """Events that contradict the state, or step events of a saga that never started."""
    state = f.state
    if state.anomalies:
        ids = {(a["service"], a["event_id"]) for a in state.anomalies}
        evidence = tuple(e for e in f.events if (e.service, e.event_id) in ids)
        return Finding(IncidentKind.ANOMALY, state.anomalies[0]["reason"], evidence)
    if not state.reported_start and f.events:
        first = min(f.events, key=lambda e: (e.received_at, e.occurred_at))
        limit = f.thresholds.stuck_after
        if f.now - first.received_at > limit:
            return Finding(
                IncidentKind.ANOMALY,
                f"events for {_ago(f.now - first.received_at)} but no saga.started "
                f"(threshold {_ago(limit)})",
                (first,),
            )
    return None


RULES: tuple[Callable[[Facts], Finding | None], ...] = (
    stuck,
    compensation_failed,
    retries_exhausted,
    in_doubt,
    anomaly,
)


def evaluate(f: Facts) -> dict[str, Finding]:
    """Every rule's finding, by incident kind."""
    return {finding.kind: finding for rule in RULES if (finding := rule(f)) is not None}


# -- when to look again --------------------------------------------------------


def needs_look(state: SagaState) -> bool:
    """True when the events alone may have opened an incident (no waiting involved)."""
    return bool(
        state.anomalies
        or state.status in (SagaStatus.FAILED, SagaStatus.COMPENSATION_FAILED)
        or any(
            s.status in (*FAILED_STEP, StepStatus.COMPENSATION_FAILED) for s in state.steps.values()
        )
    )


def next_check(
    state: SagaState, policy: Policy, *, after: datetime | None = None
) -> datetime | None:
    """The earliest time a time-based rule could fire for this state without new events.

    ``after``: only times later than this (the detector, after a pass, skips
    the conditions that fire already). None: no rule can fire by waiting.
    """
    thresholds = policy.for_type(state.saga_type)
    times: list[datetime] = [
        e.occurred_at + thresholds.in_doubt_after for e in state.prepared.values()
    ]
    if state.status not in TERMINAL_SAGA_STATUSES and state.last_received_at is not None:
        times.append(state.last_received_at + thresholds.stuck_after)
        if state.deadline is not None:
            times.append(state.deadline)
        for step in state.steps.values():
            if step.status not in ACTIVE_STEP:
                continue
            if step.deadline is not None:
                times.append(step.deadline)
            bound = policy.step_bound(state.saga_type, step.name)
            clock = _step_clock(state, step)
            if bound is not None and clock is not None:
                times.append(clock + bound.limit)
    if not state.reported_start and state.first_received_at is not None:
        times.append(state.first_received_at + thresholds.stuck_after)  # "never started"
    if after is not None:
        times = [t for t in times if t > after]
    return min(times, default=None)


def watch_at(state: SagaState, policy: Policy, *, open_incidents: bool) -> datetime | None:
    """What projection stores as the saga's ``watch_at`` after new events.

    Due at once (its newest receive time) when the new events may open or
    close an incident; otherwise when a time-based rule could next fire.
    """
    if open_incidents or needs_look(state):
        return state.last_received_at
    return next_check(state, policy)
