"""The read model as a pure function of the event store: ``fold(events) -> SagaState``.

Nothing here touches the database. Ingest and ``rebuild_read_model`` both call
:func:`fold` with a saga's stored events, so the incrementally maintained rows
and a rebuild agree by construction (tests check it with Hypothesis).

Order (docs/decisions/0003-projection-ordering.md): events are sorted by an
*effective time*, then a fixed rank per event type, then service, sequence and
event id, so the result depends only on the set of events, never on arrival
order or duplicates. Within one reporting service the reporter's ``sequence``
beats its timestamps: that service's sequenced events get its timestamps
re-dealt in sequence order (strictly increasing), so a skewed or coarse clock
cannot reorder them, while events of different services are still merged by
time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tracking.models import TERMINAL_SAGA_STATUSES, SagaStatus, StepStatus

# Tie-break rank at equal effective time: what starts before what ends.
RANK = {
    "saga.started": 0,
    "step.started": 10,
    "compensation.started": 11,
    "tx.prepared": 12,
    "message.published": 13,
    "message.consumed": 14,
    "heartbeat": 15,
    "step.succeeded": 20,
    "step.failed": 21,
    "step.timed_out": 22,
    "compensation.succeeded": 23,
    "compensation.failed": 24,
    "tx.committed": 25,
    "tx.rolled_back": 26,
    "saga.compensating": 30,
    "saga.compensated": 40,
    "saga.compensation_failed": 41,
    "saga.completed": 42,
    "saga.failed": 43,
    "saga.cancelled": 44,
}

# Events a terminal saga may still receive, by terminal status: a failed saga can
# still be compensated or have a step retried (it is running again: ADR 0012), a
# failed compensation retried (operator interventions).
_AFTER_TERMINAL = {
    SagaStatus.FAILED: {
        "step.started",
        "compensation.started",
        "compensation.succeeded",
        "compensation.failed",
        "saga.compensating",
        "saga.compensated",
        "saga.compensation_failed",
    },
    SagaStatus.COMPENSATION_FAILED: {
        "compensation.started",
        "compensation.succeeded",
        "compensation.failed",
        "saga.compensating",
        "saga.compensated",
        "saga.compensation_failed",
    },
}
_ONE_US = timedelta(microseconds=1)
EVENT_ORDER_RANK_TYPES = frozenset(RANK)


@dataclass(frozen=True, slots=True)
class FoldEvent:
    """The fields of a stored event that the projection reads."""

    service: str
    event_id: str
    type: str
    occurred_at: datetime
    received_at: datetime
    saga_type: str = ""
    step: str = ""
    attempt: int = 1
    sequence: int | None = None
    deadline: datetime | None = None
    idempotency_key: str = ""
    error: dict[str, Any] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    trace_id: str = ""


@dataclass(slots=True)
class StepState:
    name: str
    position: int
    service: str = ""
    status: str = StepStatus.PENDING
    attempt: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: int | None = None
    deadline: datetime | None = None
    last_error: dict[str, Any] | None = None
    idempotency_key: str = ""
    compensation_attempt: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class SagaState:
    saga_id: str
    saga_type: str = ""
    status: str = SagaStatus.RUNNING
    current_step: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    last_event_at: datetime | None = None
    last_received_at: datetime | None = None
    duration_ms: int | None = None
    deadline: datetime | None = None
    last_error: dict[str, Any] | None = None
    idempotency_key: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    services: list[str] = field(default_factory=list)
    trace_ids: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    anomalies: list[dict[str, str]] = field(default_factory=list)
    event_count: int = 0
    steps: dict[str, StepState] = field(default_factory=dict)
    # Read by detection only (tracking/detection.py), never stored on the row:
    reported_start: bool = False  # a saga.started event was seen
    first_received_at: datetime | None = None
    heartbeats: dict[str, datetime] = field(default_factory=dict)  # step ("" = saga) -> last
    # tx.prepared with no tx.committed / tx.rolled_back after it, by (service, step)
    prepared: dict[tuple[str, str], FoldEvent] = field(default_factory=dict)


# The canonical sort key of an event: (effective time, rank, service, sequence or -1, id).
SortKey = tuple[datetime, int, str, int, str]
# Per reporting service, of its last sequenced event: ((sequence, rank, id), its
# effective time, the latest reporter time among that service's sequenced events).
Tail = tuple[tuple[int, int, str], datetime, datetime]


def _ordered(
    events: Iterable[FoldEvent],
) -> tuple[list[tuple[SortKey, FoldEvent]], dict[str, Tail]]:
    """Deduplicate by (service, event_id); each event with its canonical sort key, sorted;
    and each service's :data:`Tail` (what :meth:`Fold.extend` needs to place later events)."""
    unique = {(e.service, e.event_id): e for e in events}
    keyed, by_service = _split(unique.values())
    tails: dict[str, Tail] = {}
    for service, group in by_service.items():
        times = sorted(e.occurred_at for e in group)
        previous: datetime | None = None
        for e, t in zip(group, times, strict=True):
            if previous is not None and t <= previous:
                t = previous + _ONE_US
            previous = t
            assert e.sequence is not None
            keyed.append(((t, RANK[e.type], service, e.sequence, e.event_id), e))
        last = group[-1]
        assert previous is not None and last.sequence is not None
        tails[service] = ((last.sequence, RANK[last.type], last.event_id), previous, times[-1])
    keyed.sort(key=lambda k: k[0])
    return keyed, tails


def _split(
    events: Iterable[FoldEvent],
) -> tuple[list[tuple[SortKey, FoldEvent]], dict[str, list[FoldEvent]]]:
    """The unsequenced events with their sort keys (their reporter time is their
    effective time), and the sequenced ones by service, in sequence order."""
    keyed: list[tuple[SortKey, FoldEvent]] = []
    by_service: dict[str, list[FoldEvent]] = defaultdict(list)
    for e in events:
        if e.sequence is None:
            keyed.append(((e.occurred_at, RANK[e.type], e.service, -1, e.event_id), e))
        else:
            by_service[e.service].append(e)
    for group in by_service.values():
        group.sort(key=lambda e: (e.sequence, RANK[e.type], e.event_id))
    return keyed, by_service


def order_events(events: Iterable[FoldEvent]) -> list[FoldEvent]:
    """Deduplicate by (service, event_id) and sort into the canonical order."""
    return [e for _, e in _ordered(events)[0]]


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, int((end - start) / timedelta(milliseconds=1)))


def fold(saga_id: str, events: Iterable[FoldEvent], *, skew_threshold: timedelta) -> SagaState:
    """Fold a saga's events (any order, duplicates allowed) into its state."""
    return Fold.of(saga_id, events, skew_threshold=skew_threshold).state


class Fold:
    """A saga's fold that can take more events later without re-reading the earlier ones.

    :meth:`of` folds a set of events (what :func:`fold` returns is its
    ``state``). :meth:`extend` applies new events when every one of them sorts
    after all those folded so far and leaves their effective times alone, which
    is exactly when folding everything again would apply the same events in
    the same order to the same state; otherwise it applies nothing and says so,
    and the caller folds the whole set again (ingest keeps folds per process:
    tracking/fold_cache.py). ``state`` is updated in place.
    """

    __slots__ = ("_flags", "_last", "_services", "_tails", "skew_threshold", "state")

    def __init__(self, saga_id: str, *, skew_threshold: timedelta) -> None:
        self.state = SagaState(saga_id=saga_id)
        self.skew_threshold = skew_threshold
        self._services: set[str] = set()
        self._flags: set[str] = set()
        self._last: SortKey | None = None  # of the last event applied
        self._tails: dict[str, Tail] = {}

    @classmethod
    def of(cls, saga_id: str, events: Iterable[FoldEvent], *, skew_threshold: timedelta) -> Fold:
        folded = cls(saga_id, skew_threshold=skew_threshold)
        keyed, folded._tails = _ordered(events)
        for _, e in keyed:
            folded._apply(e)
        if keyed:
            folded._last = keyed[-1][0]
        folded._finish()
        return folded

    def extend(self, events: Iterable[FoldEvent]) -> set[str] | None:
        """Apply ``events`` (new to this fold) if they all sort after the folded ones;
        return the names of the steps they touched, or None (nothing applied)."""
        planned = self._plan(events)
        if planned is None:
            return None
        keyed, tails = planned
        touched: set[str] = set()
        for _, e in keyed:
            self._apply(e)
            if e.step in self.state.steps:
                touched.add(e.step)
        if keyed:
            self._last = keyed[-1][0]
        self._tails = tails
        self._finish()
        return touched

    def _plan(
        self, events: Iterable[FoldEvent]
    ) -> tuple[list[tuple[SortKey, FoldEvent]], dict[str, Tail]] | None:
        """The events' sort keys as :func:`_ordered` would give them among all the
        events, or None when one would sort before a folded event or move one.

        A sequenced event keeps every earlier effective time of its service only
        if it comes last in the service's sequence order and no earlier reporter
        time of that service is later than its own (the sorted times then gain
        it at the end)."""
        tails = dict(self._tails)
        keyed, by_service = _split(events)
        for service, group in by_service.items():
            tail = tails.get(service)
            for e in group:
                assert e.sequence is not None
                order = (e.sequence, RANK[e.type], e.event_id)
                t = e.occurred_at
                latest = t
                if tail is not None:
                    if order <= tail[0] or t < tail[2]:
                        return None
                    if t <= tail[1]:
                        t = tail[1] + _ONE_US
                tail = (order, t, latest)
                keyed.append(((t, RANK[e.type], service, e.sequence, e.event_id), e))
            assert tail is not None
            tails[service] = tail
        keyed.sort(key=lambda k: k[0])
        if keyed and self._last is not None and keyed[0][0] <= self._last:
            return None
        return keyed, tails

    def _apply(self, e: FoldEvent) -> None:
        state = self.state
        state.event_count += 1
        self._services.add(e.service)
        if abs(e.received_at - e.occurred_at) > self.skew_threshold:
            self._flags.add("clock_skew")
        if e.trace_id and e.trace_id not in state.trace_ids:
            state.trace_ids.append(e.trace_id)
        if state.last_received_at is None or e.received_at > state.last_received_at:
            state.last_received_at = e.received_at
        if state.first_received_at is None or e.received_at < state.first_received_at:
            state.first_received_at = e.received_at
        if state.status in TERMINAL_SAGA_STATUSES and e.type not in _AFTER_TERMINAL.get(
            SagaStatus(state.status), ()
        ):
            state.anomalies.append(
                {
                    "event_id": e.event_id,
                    "service": e.service,
                    "type": e.type,
                    "reason": f"{e.type} after the saga was {state.status}",
                }
            )
            self._flags.add("anomaly")
            return
        _apply(state, e)

    def _finish(self) -> None:
        state = self.state
        state.services = sorted(self._services)
        state.flags = sorted(self._flags)
        state.duration_ms = _ms(state.started_at, state.ended_at)


def _step(state: SagaState, e: FoldEvent) -> StepState:
    step = state.steps.get(e.step)
    if step is None:
        step = state.steps[e.step] = StepState(name=e.step, position=len(state.steps))
    if not step.service:
        step.service = e.service
    return step


def _attempt_record(step: StepState, kind: str, attempt: int) -> dict[str, Any]:
    for record in reversed(step.attempts):
        if record["kind"] == kind and record["attempt"] == attempt:
            return record
    record = {
        "kind": kind,
        "attempt": attempt,
        "started_at": None,
        "ended_at": None,
        "outcome": "running",
        "error": None,
    }
    step.attempts.append(record)
    return record


def _iso(value: datetime) -> str:
    return value.isoformat()


def _apply(state: SagaState, e: FoldEvent) -> None:
    if state.started_at is None:
        state.started_at = e.occurred_at
    state.last_event_at = e.occurred_at
    if e.saga_type and not state.saga_type:
        state.saga_type = e.saga_type
    if e.attributes:
        state.attributes = {**state.attributes, **e.attributes}
    kind, _, what = e.type.partition(".")

    if e.type == "saga.started":
        state.reported_start = True
        state.started_at = min(state.started_at, e.occurred_at)
        state.saga_type = e.saga_type or state.saga_type
        if e.deadline is not None:
            state.deadline = e.deadline
        if e.idempotency_key:
            state.idempotency_key = e.idempotency_key
    elif kind == "saga":
        state.status = {
            "completed": SagaStatus.COMPLETED,
            "failed": SagaStatus.FAILED,
            "compensating": SagaStatus.COMPENSATING,
            "compensated": SagaStatus.COMPENSATED,
            "compensation_failed": SagaStatus.COMPENSATION_FAILED,
            "cancelled": SagaStatus.CANCELLED,
        }[what]
        if e.error is not None:
            state.last_error = e.error
        if state.status in TERMINAL_SAGA_STATUSES:
            state.ended_at = e.occurred_at
            state.current_step = ""
        else:  # compensating again after a failure: the saga is open once more
            state.ended_at = None
    elif kind == "step":
        step = _step(state, e)
        record = _attempt_record(step, "forward", e.attempt)
        if e.deadline is not None:
            step.deadline = e.deadline
        if e.idempotency_key:
            step.idempotency_key = e.idempotency_key
        if what == "started":
            if state.status == SagaStatus.FAILED:  # a step retried after the saga failed
                state.status = SagaStatus.RUNNING
                state.ended_at = None
            step.status = StepStatus.RUNNING
            step.attempt = max(step.attempt, e.attempt)
            step.started_at = e.occurred_at
            step.ended_at = step.duration_ms = None
            record["started_at"] = _iso(e.occurred_at)
            state.current_step = e.step
        else:
            step.attempt = max(step.attempt, e.attempt)
            step.status = {
                "succeeded": StepStatus.SUCCEEDED,
                "failed": StepStatus.FAILED,
                "timed_out": StepStatus.TIMED_OUT,
            }[what]
            step.ended_at = e.occurred_at
            if step.started_at is None:
                step.started_at = e.occurred_at
            step.duration_ms = _ms(step.started_at, step.ended_at)
            record["ended_at"] = _iso(e.occurred_at)
            record["outcome"] = what
            if what == "succeeded":
                step.last_error = None
            else:
                record["error"] = e.error
                step.last_error = e.error or {"type": what, "message": "", "retryable": None}
                state.last_error = {**step.last_error, "step": e.step}
            if state.current_step == e.step and what == "succeeded":
                state.current_step = ""
    elif kind == "compensation":
        step = _step(state, e)
        record = _attempt_record(step, "compensation", e.attempt)
        if state.status == SagaStatus.RUNNING or state.status in TERMINAL_SAGA_STATUSES:
            state.status = SagaStatus.COMPENSATING
            state.ended_at = None
        if what == "started":
            step.status = StepStatus.COMPENSATING
            step.compensation_attempt = max(step.compensation_attempt, e.attempt)
            record["started_at"] = _iso(e.occurred_at)
            state.current_step = e.step
        else:
            step.compensation_attempt = max(step.compensation_attempt, e.attempt)
            step.status = (
                StepStatus.COMPENSATED if what == "succeeded" else StepStatus.COMPENSATION_FAILED
            )
            record["ended_at"] = _iso(e.occurred_at)
            record["outcome"] = what
            if what == "failed":
                record["error"] = e.error
                step.last_error = e.error or {
                    "type": "compensation_failed",
                    "message": "",
                    "retryable": None,
                }
                state.last_error = {**step.last_error, "step": e.step}
    elif kind == "tx":
        if what == "prepared":
            state.prepared[(e.service, e.step)] = e
        else:
            state.prepared.pop((e.service, e.step), None)
        if e.step:
            step = _step(state, e)
            if e.idempotency_key:
                step.idempotency_key = e.idempotency_key
    elif e.type == "heartbeat":
        state.heartbeats[e.step] = e.occurred_at
    # message.* only move last_event_at (done above).
