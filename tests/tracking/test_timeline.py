"""The waterfall layout."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tracking.models import Saga
from tracking.selectors import saga_events_list, saga_get
from tracking.timeline import saga_timeline_build

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def at(s: float) -> str:
    return (T0 + timedelta(seconds=s)).isoformat()


def test_the_gap_before_a_retried_step_starts_at_its_first_attempt(api) -> None:
    api.batch(
        [
            {"id": "1", "saga_id": "g", "type": "step.started", "step": "a", "occurred_at": at(0)},
            {
                "id": "2",
                "saga_id": "g",
                "type": "step.succeeded",
                "step": "a",
                "occurred_at": at(1),
            },
            {"id": "3", "saga_id": "g", "type": "step.started", "step": "b", "occurred_at": at(2)},
            {"id": "4", "saga_id": "g", "type": "step.failed", "step": "b", "occurred_at": at(3)},
            {
                "id": "5",
                "saga_id": "g",
                "type": "step.started",
                "step": "b",
                "attempt": 2,
                "occurred_at": at(5),
            },
            {
                "id": "6",
                "saga_id": "g",
                "type": "step.succeeded",
                "step": "b",
                "attempt": 2,
                "occurred_at": at(6),
            },
        ]
    )
    saga = saga_get(saga_id="g")
    assert isinstance(saga, Saga)
    timeline = saga_timeline_build(saga=saga, events=saga_events_list(saga_id="g"), now=T0)
    lanes = {lane.name: lane for lane in timeline.lanes}
    assert lanes["b"].gap_before_ms == 1000
    assert [(b.attempt, b.outcome) for b in lanes["b"].bars] == [(1, "failed"), (2, "succeeded")]
    assert timeline.span_ms == 6000
    assert abs(lanes["b"].bars[1].left - 83.333) < 0.01
