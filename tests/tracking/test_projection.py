"""The projection is a pure function of the *set* of events."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from tracking.projection import EVENT_ORDER_RANK_TYPES, Fold, FoldEvent, fold, order_events

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
SKEW = timedelta(seconds=30)


def ev(type: str, n: int, *, step: str = "", service: str = "order", **kw: object) -> FoldEvent:
    at = T0 + timedelta(seconds=n)
    return FoldEvent(
        service=service,
        event_id=f"e{n}-{type}",
        type=type,
        occurred_at=at,
        received_at=kw.pop("received_at", at),
        step=step,
        **kw,  # type: ignore[arg-type]
    )


def test_happy_saga_completes_with_step_durations() -> None:
    # given a saga whose two steps succeed
    events = [
        ev("saga.started", 0, saga_type="order"),
        ev("step.started", 1, step="charge"),
        ev("step.succeeded", 3, step="charge"),
        ev("step.started", 4, step="ship"),
        ev("step.succeeded", 9, step="ship"),
        ev("saga.completed", 10),
    ]
    # when folded
    state = fold("s1", events, skew_threshold=SKEW)
    # then
    assert state.status == "completed"
    assert state.saga_type == "order"
    assert state.duration_ms == 10_000
    assert [s.name for s in state.steps.values()] == ["charge", "ship"]
    assert state.steps["ship"].duration_ms == 5_000
    assert state.steps["charge"].status == "succeeded"
    assert state.current_step == ""
    assert state.event_count == 6
    assert state.flags == []


def test_retry_records_every_attempt_and_last_error() -> None:
    error = {"type": "Timeout", "message": "bank did not answer", "retryable": True}
    events = [
        ev("step.started", 1, step="charge", attempt=1),
        ev("step.failed", 2, step="charge", attempt=1, error=error),
        ev("step.started", 3, step="charge", attempt=2),
    ]
    state = fold("s1", events, skew_threshold=SKEW)
    step = state.steps["charge"]
    assert step.status == "running"
    assert step.attempt == 2
    assert [(a["attempt"], a["outcome"]) for a in step.attempts] == [(1, "failed"), (2, "running")]
    assert step.attempts[0]["error"] == error
    assert state.last_error == {**error, "step": "charge"}
    assert state.current_step == "charge"


def test_compensation_failure_is_its_own_state() -> None:
    events = [
        ev("step.started", 1, step="charge"),
        ev("step.succeeded", 2, step="charge"),
        ev("step.started", 3, step="stock"),
        ev("step.failed", 4, step="stock"),
        ev("compensation.started", 5, step="charge"),
        ev("compensation.failed", 6, step="charge", error={"type": "RefundDeclined"}),
        ev("saga.compensation_failed", 7),
    ]
    state = fold("s1", events, skew_threshold=SKEW)
    assert state.status == "compensation_failed"
    assert state.steps["charge"].status == "compensation_failed"
    assert state.steps["charge"].attempts[-1]["kind"] == "compensation"
    assert state.last_error == {"type": "RefundDeclined", "step": "charge"}


def test_a_terminal_saga_never_regresses_and_the_late_event_is_an_anomaly() -> None:
    events = [
        ev("saga.started", 0, saga_type="order"),
        ev("saga.completed", 5),
        ev("step.started", 9, step="charge"),
    ]
    state = fold("s1", events, skew_threshold=SKEW)
    assert state.status == "completed"
    assert "charge" not in state.steps
    assert state.flags == ["anomaly"]
    assert state.anomalies[0]["type"] == "step.started"
    assert state.event_count == 3  # kept, counted, not applied


def test_a_failed_saga_can_still_be_compensated_later() -> None:
    events = [
        ev("step.succeeded", 1, step="charge"),
        ev("saga.failed", 2),
        ev("compensation.started", 3, step="charge"),
        ev("compensation.succeeded", 4, step="charge"),
        ev("saga.compensated", 5),
    ]
    state = fold("s1", events, skew_threshold=SKEW)
    assert state.status == "compensated"
    assert state.flags == []


def test_sequence_beats_a_reporters_clock_within_one_service() -> None:
    # given a reporter whose clock put "succeeded" before "started"
    started = ev("step.started", 5, step="charge", sequence=1)
    succeeded = replace(ev("step.succeeded", 1, step="charge", sequence=2))
    state = fold("s1", [succeeded, started], skew_threshold=SKEW)
    # then sequence wins: the step ends succeeded, not running
    assert state.steps["charge"].status == "succeeded"
    assert [e.type for e in order_events([succeeded, started])] == [
        "step.started",
        "step.succeeded",
    ]


def test_clock_skew_is_flagged_not_rewritten() -> None:
    skewed = ev("step.started", 1, step="charge", received_at=T0 + timedelta(minutes=5))
    state = fold("s1", [skewed], skew_threshold=SKEW)
    assert state.flags == ["clock_skew"]
    assert state.steps["charge"].started_at == T0 + timedelta(seconds=1)


# --- properties ---------------------------------------------------------------
TYPES = sorted(EVENT_ORDER_RANK_TYPES)
event_strategy = st.builds(
    lambda type, n, step, service, attempt, seq, skew: FoldEvent(
        service=service,
        event_id=f"{service}-{n}-{type}",
        type=type,
        occurred_at=T0 + timedelta(seconds=n % 7),  # few distinct times: many ties
        received_at=T0 + timedelta(seconds=n % 7 + skew),
        step=step,
        attempt=attempt,
        sequence=seq,
        saga_type="order" if type == "saga.started" else "",
        error={"type": "E", "message": str(n)} if type.endswith("failed") else None,
        attributes={"k": n % 3},
        trace_id=f"{n % 2:032x}",
    ),
    type=st.sampled_from(TYPES),
    n=st.integers(0, 40),
    step=st.sampled_from(["a", "b", "c"]),
    service=st.sampled_from(["order", "payment"]),
    attempt=st.integers(1, 3),
    seq=st.one_of(st.none(), st.integers(0, 10)),
    skew=st.sampled_from([0, 0, 60]),
)


def _store_key(e: FoldEvent) -> tuple[str, str]:
    return (e.service, e.event_id)  # the event store holds one event per key


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(event_strategy, min_size=1, max_size=30, unique_by=_store_key), data=st.data()
)
def test_any_permutation_with_duplicates_folds_to_the_in_order_state(events, data) -> None:  # type: ignore[no-untyped-def]
    in_order = fold("s", order_events(events), skew_threshold=SKEW)
    shuffled = data.draw(st.permutations(events))
    dupes = data.draw(st.lists(st.sampled_from(events), max_size=10))
    assert fold("s", [*shuffled, *dupes], skew_threshold=SKEW) == in_order


@settings(max_examples=200, deadline=None)
@given(events=st.lists(event_strategy, min_size=1, max_size=30, unique_by=_store_key))
def test_within_a_service_sequenced_events_fold_in_sequence_order(events) -> None:  # type: ignore[no-untyped-def]
    ordered = order_events(events)
    for service in ("order", "payment"):
        seqs = [e.sequence for e in ordered if e.service == service and e.sequence is not None]
        assert seqs == sorted(seqs)


def test_compensating_again_after_a_failure_reopens_the_saga() -> None:
    events = [
        ev("saga.started", 0, saga_type="order"),
        ev("saga.failed", 5),
        ev("saga.compensating", 6),
    ]
    state = fold("s1", events, skew_threshold=SKEW)
    assert state.status == "compensating"
    assert state.ended_at is None
    assert state.duration_ms is None


def test_a_step_retried_after_the_saga_failed_reopens_it() -> None:
    """ADR 0012: an operator's retry of a failed saga's step makes it running again."""
    from datetime import UTC, datetime, timedelta

    from tracking.projection import FoldEvent, fold

    t0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)

    def ev(n: int, type_: str, step: str = "", attempt: int = 1) -> FoldEvent:
        at = t0 + timedelta(seconds=n)
        return FoldEvent("svc", f"e{n}", type_, at, at, step=step, attempt=attempt)

    failed = [
        ev(0, "saga.started"),
        ev(1, "step.started", "charge"),
        ev(2, "step.failed", "charge"),
        ev(3, "saga.failed"),
    ]
    state = fold("s", failed, skew_threshold=timedelta(seconds=30))
    assert state.status == "failed" and state.ended_at is not None
    retried = [
        *failed,
        ev(4, "step.started", "charge", 2),
        ev(5, "step.succeeded", "charge", 2),
        ev(6, "saga.completed"),
    ]
    state = fold("s", retried, skew_threshold=timedelta(seconds=30))
    assert (state.status, state.anomalies) == ("completed", [])
    assert state.steps["charge"].attempt == 2
    # still an anomaly: anything else after the failure, e.g. a new step's success
    late = fold(
        "s", [*failed, ev(4, "step.succeeded", "ship")], skew_threshold=timedelta(seconds=30)
    )
    assert late.status == "failed" and [a["type"] for a in late.anomalies] == ["step.succeeded"]


# --- Fold.extend: applying later events to a kept fold (ingest's fold cache) ----


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(event_strategy, min_size=1, max_size=30, unique_by=_store_key), data=st.data()
)
def test_an_extended_fold_equals_the_fold_of_all_events_whenever_it_extends(events, data) -> None:  # type: ignore[no-untyped-def]
    # given the events arriving in random order, in up to four batches
    arrived = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(arrived)), max_size=3)))
    batches = [arrived[a:b] for a, b in zip([0, *cuts], [*cuts, len(arrived)], strict=True)]
    # when a fold of the first batch takes each later batch, or refuses it
    kept = Fold.of("s", batches[0], skew_threshold=SKEW)
    seen = list(batches[0])
    for batch in batches[1:]:
        before = copy.deepcopy(kept.state)
        touched = kept.extend(batch)
        seen += batch
        if touched is None:
            # then a refusal changes nothing, and the caller folds everything again
            assert kept.state == before
            kept = Fold.of("s", seen, skew_threshold=SKEW)
        # then the kept fold is always the fold of every event so far
        assert kept.state == fold("s", seen, skew_threshold=SKEW)


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(TYPES), min_size=2, max_size=30),
    services=st.lists(st.sampled_from(["order", "payment"]), min_size=30, max_size=30),
    sequenced=st.booleans(),
    data=st.data(),
)
def test_events_reported_in_order_always_extend_the_fold(kinds, services, sequenced, data) -> None:  # type: ignore[no-untyped-def]
    # given a saga's events as reporters send them: each service's clock moves on
    # (sometimes standing still), its sequence counts up
    events = []
    for n, (kind, service) in enumerate(zip(kinds, services, strict=False)):
        at = T0 + timedelta(milliseconds=data.draw(st.sampled_from([0, 1, 7])) + 10 * n)
        events.append(
            FoldEvent(
                service=service,
                event_id=f"{service}-{n}",
                type=kind,
                occurred_at=at,
                received_at=at,
                step="abc"[n % 3],
                sequence=n if sequenced else None,
            )
        )
    ordered = order_events(events)
    cut = data.draw(st.integers(1, len(ordered) - 1))
    # when a fold of the first ones takes the rest, one at a time
    kept = Fold.of("s", ordered[:cut], skew_threshold=SKEW)
    for e in ordered[cut:]:
        before = copy.deepcopy(kept.state.steps)
        touched = kept.extend([e])
        # then every one extends it, touching at most its own step, and the steps
        # it reports are all the steps that changed (ingest writes only those)
        assert touched is not None
        assert touched <= {e.step}
        changed = {n for n, st in kept.state.steps.items() if before.get(n) != st}
        assert changed <= touched
    assert kept.state == fold("s", events, skew_threshold=SKEW)


def test_a_late_event_that_sorts_before_the_folded_ones_is_refused() -> None:
    kept = Fold.of(
        "s",
        [ev("saga.started", 0, saga_type="order"), ev("step.started", 5, step="pay")],
        skew_threshold=SKEW,
    )
    before = copy.deepcopy(kept.state)
    assert kept.extend([ev("step.started", 3, step="book")]) is None
    assert kept.state == before
    assert kept.extend([ev("step.succeeded", 6, step="pay")]) == {"pay"}
    assert kept.state.steps["pay"].status == "succeeded"


def test_a_sequenced_event_whose_clock_lags_its_service_is_refused() -> None:
    """Its service's times are re-dealt in sequence order, moving a folded event."""
    kept = Fold.of("s", [ev("saga.started", 5, saga_type="order", sequence=1)], skew_threshold=SKEW)
    assert kept.extend([ev("step.started", 2, step="pay", sequence=2)]) is None
    assert kept.extend([ev("step.started", 6, step="pay", sequence=2)]) == {"pay"}
