"""Each detection rule with events that should and should not trigger it (no DB, no sleeping)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tracking.detection import (
    Facts,
    anomaly,
    compensation_failed,
    evaluate,
    in_doubt,
    needs_look,
    next_check,
    retries_exhausted,
    stuck,
    watch_at,
)
from tracking.policy import Learned, Policy, TypePolicy
from tracking.projection import FoldEvent, fold, order_events

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
_n = itertools.count()


def ev(type_: str, at: float, **fields: Any) -> FoldEvent:
    """An event ``at`` seconds after T0, received when it occurred unless ``received`` says."""
    received = fields.pop("received", at)
    fields.setdefault("service", "svc")
    if type_ == "saga.started":
        fields.setdefault("saga_type", "order")
    return FoldEvent(
        event_id=f"e{next(_n)}",
        type=type_,
        occurred_at=T0 + timedelta(seconds=at),
        received_at=T0 + timedelta(seconds=received),
        **fields,
    )


def policy(**overrides: Any) -> Policy:
    learned = overrides.pop("learned", {})
    base = dict(
        stuck_after=timedelta(minutes=10),
        max_attempts=3,
        in_doubt_after=timedelta(minutes=5),
        step_thresholds={},
    )
    base.update(overrides)
    return Policy(
        types={"order": TypePolicy(**base)},
        default=TypePolicy(**base),
        learned=learned,
        p99_multiple=3.0,
        min_samples=100,
    )


def facts(events: list[FoldEvent], at: float, pol: Policy | None = None) -> Facts:
    ordered = order_events(events)
    state = fold("s1", ordered, skew_threshold=timedelta(seconds=30))
    return Facts(state, ordered, pol or policy(), T0 + timedelta(seconds=at))


RUNNING = [ev("saga.started", 0), ev("step.started", 1, step="charge")]


# -- stuck --------------------------------------------------------------------


def test_stuck_when_a_running_saga_is_silent_past_its_threshold() -> None:
    assert stuck(facts(RUNNING, 1 + 599)) is None  # 9 min 59 s of silence
    finding = stuck(facts(RUNNING, 1 + 601))
    assert finding is not None and finding.kind == "stuck"
    assert "no event for 10 min" in finding.reason
    assert [e.event_id for e in finding.evidence] == [RUNNING[-1].event_id]
    assert finding.step == "charge"


def test_a_heartbeat_is_progress() -> None:
    events = [*RUNNING, ev("heartbeat", 500, step="charge")]
    assert stuck(facts(events, 1 + 601)) is None
    assert stuck(facts(events, 500 + 601)) is not None


def test_silence_is_measured_on_the_server_clock_not_the_reporters() -> None:
    # the reporter's clock is an hour behind; the events arrived just now
    events = [
        ev("saga.started", -3600, received=0),
        ev("step.started", -3599, step="charge", received=1),
    ]
    assert stuck(facts(events, 60)) is None


def test_terminal_sagas_are_never_stuck() -> None:
    events = [*RUNNING, ev("step.succeeded", 2, step="charge"), ev("saga.completed", 3)]
    assert stuck(facts(events, 10_000)) is None


def test_stuck_when_a_step_runs_past_its_configured_threshold() -> None:
    pol = policy(step_thresholds={"charge": timedelta(seconds=30)})
    assert stuck(facts(RUNNING, 30)) is None
    finding = stuck(facts(RUNNING, 32, pol))
    assert finding is not None and finding.step == "charge"
    assert "past its bound of 30 s (configured)" in finding.reason
    assert finding.evidence[0].type == "step.started"


def test_stuck_past_a_multiple_of_the_learned_p99_once_enough_samples_exist() -> None:
    learned = {
        ("order", "charge"): Learned(count=500, failures=0, p50_ms=2000, p95_ms=5000, p99_ms=10_000)
    }
    assert stuck(facts(RUNNING, 1 + 29, policy(learned=learned))) is None  # bound: 3 x 10 s
    finding = stuck(facts(RUNNING, 1 + 31, policy(learned=learned)))
    assert finding is not None and "(learned)" in finding.reason
    few = {("order", "charge"): Learned(count=99, failures=0, p50_ms=1, p95_ms=1, p99_ms=1)}
    assert stuck(facts(RUNNING, 1 + 31, policy(learned=few))) is None  # too few samples


def test_a_step_heartbeat_restarts_its_learned_clock() -> None:
    learned = {
        ("order", "charge"): Learned(count=500, failures=0, p50_ms=1, p95_ms=1, p99_ms=10_000)
    }
    events = [*RUNNING, ev("heartbeat", 25, step="charge")]
    assert stuck(facts(events, 40, policy(learned=learned))) is None
    assert stuck(facts(events, 56, policy(learned=learned))) is not None


def test_stuck_past_a_reported_step_deadline() -> None:
    events = [
        ev("saga.started", 0),
        ev("step.started", 1, step="charge", deadline=T0 + timedelta(seconds=20)),
    ]
    assert stuck(facts(events, 19)) is None
    finding = stuck(facts(events, 21))
    assert finding is not None and "past its deadline" in finding.reason


def test_stuck_past_the_sagas_deadline() -> None:
    events = [ev("saga.started", 0, deadline=T0 + timedelta(seconds=60)), RUNNING[1]]
    assert stuck(facts(events, 59)) is None
    assert stuck(facts(events, 61)) is not None


# -- compensation_failed --------------------------------------------------------

FAILED = [
    *RUNNING,
    ev("step.succeeded", 2, step="charge"),
    ev("step.started", 3, step="reserve"),
    ev("step.failed", 4, step="reserve", error={"type": "OutOfStock", "retryable": False}),
    ev("compensation.started", 5, step="charge"),
]


def test_compensation_failed_when_a_compensation_failed_and_did_not_succeed_since() -> None:
    failed = [*FAILED, ev("compensation.failed", 6, step="charge", error={"type": "Timeout"})]
    finding = compensation_failed(facts(failed, 7))
    assert finding is not None and finding.step == "charge"
    assert [e.type for e in finding.evidence] == ["compensation.failed"]
    retried = [
        *failed,
        ev("compensation.started", 8, step="charge", attempt=2),
        ev("compensation.succeeded", 9, step="charge", attempt=2),
    ]
    assert compensation_failed(facts(retried, 10)) is None
    assert compensation_failed(facts(FAILED, 7)) is None  # still compensating


def test_compensation_failed_when_the_saga_reports_it() -> None:
    finding = compensation_failed(facts([*FAILED, ev("saga.compensation_failed", 6)], 7))
    assert finding is not None
    assert [e.type for e in finding.evidence] == ["saga.compensation_failed"]


# -- retries_exhausted ----------------------------------------------------------


def test_retries_exhausted_on_a_non_retryable_failure_that_nothing_compensates() -> None:
    events = FAILED[:-1]  # no compensation.started
    finding = retries_exhausted(facts(events, 5))
    assert finding is not None and finding.step == "reserve"
    assert "non-retryable" in finding.reason
    assert retries_exhausted(facts(FAILED, 6)) is None  # something compensates


def test_retries_exhausted_when_failed_attempts_reach_the_types_limit() -> None:
    events = [ev("saga.started", 0)]
    for attempt in (1, 2):
        events += [
            ev("step.started", attempt * 10, step="charge", attempt=attempt),
            ev(
                "step.failed",
                attempt * 10 + 1,
                step="charge",
                attempt=attempt,
                error={"type": "503"},
            ),
        ]
    assert retries_exhausted(facts(events, 30)) is None  # 2 of 3
    events += [
        ev("step.started", 30, step="charge", attempt=3),
        ev("step.timed_out", 31, step="charge", attempt=3),
    ]
    finding = retries_exhausted(facts(events, 40))
    assert finding is not None and "failed 3 times (limit 3)" in finding.reason
    assert len(finding.evidence) == 3


# -- in_doubt ----------------------------------------------------------------------


def test_in_doubt_when_a_prepared_participant_hears_nothing_within_the_timeout() -> None:
    events = [*RUNNING, ev("tx.prepared", 2, step="charge", service="bank")]
    assert in_doubt(facts(events, 2 + 299)) is None
    finding = in_doubt(facts(events, 2 + 301))
    assert finding is not None and "bank/charge prepared" in finding.reason
    assert [e.type for e in finding.evidence] == ["tx.prepared"]
    for outcome in ("tx.committed", "tx.rolled_back"):
        done = [*events, ev(outcome, 3, step="charge", service="bank")]
        assert in_doubt(facts(done, 10_000)) is None


def test_in_doubt_applies_after_the_saga_finished_too() -> None:
    events = [
        *RUNNING,
        ev("tx.prepared", 2, step="charge", service="bank"),
        ev("step.succeeded", 3, step="charge"),
        ev("saga.completed", 4),
    ]
    assert in_doubt(facts(events, 1000)) is not None


# -- anomaly ----------------------------------------------------------------------


def test_anomaly_when_an_event_contradicts_a_terminal_state() -> None:
    done = [*RUNNING, ev("step.succeeded", 2, step="charge"), ev("saga.completed", 3)]
    assert anomaly(facts(done, 10)) is None
    late = ev("step.started", 4, step="ship")
    finding = anomaly(facts([*done, late], 10))
    assert finding is not None and finding.evidence == (late,)


def test_anomaly_when_step_events_of_a_never_started_saga_are_older_than_the_threshold() -> None:
    orphan = [ev("step.started", 0, step="charge")]
    assert anomaly(facts(orphan, 599)) is None
    finding = anomaly(facts(orphan, 601))
    assert finding is not None and "no saga.started" in finding.reason
    assert anomaly(facts([ev("saga.started", 0), *orphan], 601)) is None


# -- together ---------------------------------------------------------------------


def test_a_healthy_saga_finds_nothing() -> None:
    done = [*RUNNING, ev("step.succeeded", 2, step="charge"), ev("saga.completed", 3)]
    assert evaluate(facts(done, 100_000)) == {}
    assert evaluate(facts(RUNNING, 5)) == {}


DONE_WITH_PREPARE = [
    *RUNNING,
    ev("tx.prepared", 2, service="bank", step="charge"),
    ev("step.succeeded", 3, step="charge"),
    ev("saga.completed", 4),
]


@pytest.mark.parametrize(
    ("events", "first", "then"),
    [
        (RUNNING, 1 + 600, None),  # silence, counted from the last receive
        ([*RUNNING, ev("tx.prepared", 2, service="bank", step="charge")], 2 + 300, 2 + 600),
        (DONE_WITH_PREPARE, 2 + 300, None),  # finished: only the prepare can still fire
    ],
)
def test_next_check_is_when_a_waiting_rule_could_first_fire(
    events: list[FoldEvent], first: float, then: float | None
) -> None:
    f = facts(events, 0)
    assert next_check(f.state, f.policy) == T0 + timedelta(seconds=first)
    # the detector asks for times after now: rules that fire already are skipped
    later = next_check(f.state, f.policy, after=T0 + timedelta(seconds=first))
    assert later == (None if then is None else T0 + timedelta(seconds=then))


def test_a_settled_saga_needs_no_watch_and_a_failed_one_is_due_at_once() -> None:
    done = facts([*RUNNING, ev("step.succeeded", 2, step="charge"), ev("saga.completed", 3)], 0)
    assert watch_at(done.state, done.policy, open_incidents=False) is None
    assert watch_at(done.state, done.policy, open_incidents=True) == done.state.last_received_at
    failed = facts(FAILED[:-1], 0)
    assert needs_look(failed.state)
    assert (
        watch_at(failed.state, failed.policy, open_incidents=False) == failed.state.last_received_at
    )
