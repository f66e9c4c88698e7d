"""Group commits: a worker advances its claimed runs one transition each per transaction;
sagas start many at once; an action's savepoint is taken only when it writes."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import outbox
from orchestrator import RetryPolicy, Step, StepFailed, engine, saga_define, sagas_start
from orchestrator.definitions import UnknownSagaType
from orchestrator.engine import (
    StartRefused,
    StepsKept,
    runs_advance,
    saga_start,
    steps_snapshot,
    transition_save,
)
from orchestrator.models import SagaRun, StepRun
from orchestrator.reporting import Telemetry
from orchestrator.worker import Worker, claims_release, runs_claim
from outbox.models import OutboxMessage
from tests.conftest import need, pg_activity_wait
from tests.orchestrator import sagas
from tracking.models import Saga, Service, TelemetryEvent

pytestmark = pytest.mark.django_db(transaction=True)
ONCE = RetryPolicy(max_attempts=1)


def _writes_then_fails(ctx: Any) -> None:
    outbox.publish(topic="test.effects", key=ctx.saga_id, type="test.half", payload={})
    raise StepFailed("half done, then refused", type="Refused", retryable=False)


def _nothing(ctx: Any) -> None:
    return None


saga_define(
    "test-half",
    service="order",
    steps=[Step("write", action=_writes_then_fails, compensation=_nothing, retry=ONCE)],
)


def _fails_its_first_try(ctx: Any) -> Any:
    if ctx.attempt == 1:
        raise ConnectionError("away for a moment")
    return sagas.do(ctx)


saga_define(
    "test-flaky",
    service="order",
    steps=[
        Step("create_order", action=sagas.do, retry=sagas.FAST),
        Step("reserve_stock", action=_fails_its_first_try, retry=sagas.FAST),
        Step("create_shipment", action=sagas.do, retry=sagas.FAST),
    ],
)


def _writes_a_duplicate(ctx: Any) -> None:
    Service.objects.create(name="dup")
    Service.objects.create(name="dup")  # IntegrityError: the transaction needs a rollback


def _needs_a_locked_row(ctx: Any) -> None:
    Service.objects.select_for_update(nowait=True).get(name="locked")


saga_define(
    "test-dup", service="order", steps=[Step("write", action=_writes_a_duplicate, retry=ONCE)]
)
saga_define(
    "test-locked", service="order", steps=[Step("lock", action=_needs_a_locked_row, retry=ONCE)]
)
saga_define("test-quiet", service="order", steps=[Step(n, action=_nothing) for n in ("a", "b")])


@pytest.fixture(autouse=True)
def _generous_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded machine must not make a round leave runs out (the budget has its own test)."""
    monkeypatch.setattr(engine, "GROUP_SECONDS", 60.0)


def _statements(ctx: CaptureQueriesContext, *words: str) -> int:
    return sum(1 for q in ctx.captured_queries if all(w in (q["sql"] or "") for w in words))


def test_one_transaction_advances_every_claimed_run(postgres: None) -> None:
    need(connection.vendor == "postgresql", "group writes are one statement on PostgreSQL")
    for i in range(5):
        saga_start(saga_type="test-order", saga_id=f"g-{i}")
    claims = runs_claim(owner="w", limit=10)
    assert len(claims) == 5

    with CaptureQueriesContext(connection) as ctx:
        again = runs_advance(claims)

    assert again == claims  # each did its first step and may go on
    assert _statements(ctx, "FOR UPDATE", '"orchestrator_sagarun"') == 1  # all five locked at once
    assert _statements(ctx, 'UPDATE "orchestrator_sagarun"') == 1
    assert _statements(ctx, 'UPDATE "orchestrator_steprun"') == 1
    steps = dict(StepRun.objects.filter(name="create_order").values_list("run__saga_id", "status"))
    assert steps == {f"g-{i}": "succeeded" for i in range(5)}
    assert set(SagaRun.objects.values_list("version", flat=True)) == {2}
    # each saga's timeline has its step, reported in the same transaction
    assert TelemetryEvent.objects.filter(type="step.succeeded").count() == 5
    claims_release(claims)
    assert not SagaRun.objects.exclude(lease_owner="").exists()


def test_a_round_hands_back_runs_that_wait_and_keeps_those_that_go_on(postgres: None) -> None:
    sagas.SCRIPT["forward:create_order"] = ["fail"]  # the first saga's first try: a retry waits
    for i in range(2):
        saga_start(saga_type="test-order", saga_id=f"hand-{i}")
    claims = runs_claim(owner="w", limit=2)

    again = runs_advance(claims)

    waiting, going = (SagaRun.objects.get(saga_id=f"hand-{i}") for i in range(2))
    assert [c.pk for c in again] == [going.pk]
    assert (waiting.lease_owner, waiting.lease_until) == ("", None)  # another worker may take it
    assert going.lease_owner == "w" and going.lease_until is not None


def test_a_run_no_longer_due_when_its_round_comes_is_handed_back(postgres: None) -> None:
    for i in range(2):
        saga_start(saga_type="test-order", saga_id=f"idle-{i}")
    claims = runs_claim(owner="w", limit=2)
    later = timezone.now() + timedelta(hours=1)
    SagaRun.objects.filter(saga_id="idle-0").update(next_run_at=later)  # an operator, say

    again = runs_advance(claims)

    idle, going = (SagaRun.objects.get(saga_id=f"idle-{i}") for i in range(2))
    assert [c.pk for c in again] == [going.pk]
    assert (idle.lease_owner, idle.lease_until, idle.version) == ("", None, 1)  # untouched
    assert going.version == 2 and going.lease_owner == "w"


def test_sagas_start_inserts_in_chunks_the_database_can_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection.ops, "bulk_batch_size", lambda fields, objs: 2)
    with CaptureQueriesContext(connection) as ctx:
        runs = sagas_start(saga_type="test-order", sagas=[(f"chunk-{i}", {}) for i in range(5)])
    assert _statements(ctx, "INSERT", '"orchestrator_sagarun"') == 3
    assert sorted(r.saga_id for r in runs) == [f"chunk-{i}" for i in range(5)]
    assert all(r.pk for r in runs) and SagaRun.objects.count() == 5


def test_the_time_budget_leaves_runs_for_the_next_round_still_claimed(
    postgres: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "GROUP_SECONDS", 0.0)  # spent after the first transition
    for i in range(3):
        saga_start(saga_type="test-order", saga_id=f"budget-{i}")
    claims = runs_claim(owner="w", limit=3)

    again = runs_advance(claims)

    # one transition made; the two left out come first next time, then the one that goes on
    assert again == [claims[1], claims[2], claims[0]]
    versions = dict(SagaRun.objects.values_list("pk", "version"))
    assert [versions[c.pk] for c in claims] == [2, 1, 1]
    assert set(SagaRun.objects.values_list("lease_owner", flat=True)) == {"w"}
    assert runs_advance(again)[:2] == [claims[2], claims[0]]  # and so on, in turn


def test_a_group_ends_each_saga_as_if_it_ran_alone(postgres: None) -> None:
    def timeline(saga_id: str) -> list[tuple[str, str]]:
        return list(
            TelemetryEvent.objects.filter(saga_id=saga_id)
            .order_by("sequence")
            .values_list("type", "step")
        )

    saga_start(saga_type="test-flaky", saga_id="alone")  # one retry on the way
    Worker(batch=1).drain()
    sagas_start(saga_type="test-flaky", sagas=[(f"together-{i}", {"i": i}) for i in range(3)])
    Worker(batch=3).drain()

    expected = timeline("alone")
    assert ("step.failed", "reserve_stock") in expected and expected[-1][0] == "saga.completed"
    for i in range(3):
        assert timeline(f"together-{i}") == expected
        assert Saga.objects.get(saga_id=f"together-{i}").status == "completed"
    effects = Counter(
        (m.payload if isinstance(m.payload, dict) else json.loads(m.payload))["key"]
        for m in OutboxMessage.objects.filter(type="test.effect")
    )
    assert len(effects) == 12 and set(effects.values()) == {1}  # 4 sagas, 3 steps, once each


def test_a_run_that_breaks_its_group_is_set_aside_and_the_others_finish(postgres: None) -> None:
    for saga_id in ("ok-1", "bad", "ok-2"):
        saga_start(saga_type="test-quiet", saga_id=saga_id)
    SagaRun.objects.filter(saga_id="bad").update(saga_type="no-such-type")  # a deploy lost it

    with pytest.raises(UnknownSagaType):
        runs_advance(runs_claim(owner="probe", limit=3))  # the group rolls back whole
    assert set(SagaRun.objects.values_list("version", flat=True)) == {1}
    SagaRun.objects.update(lease_owner="", lease_until=None)

    Worker(batch=3).drain()  # the group fails again; then run by run

    statuses = dict(SagaRun.objects.values_list("saga_id", "status"))
    assert statuses == {"ok-1": "completed", "bad": "running", "ok-2": "completed"}
    bad = SagaRun.objects.get(saga_id="bad")
    assert bad.waiting.startswith("error, retried in a minute: UnknownSagaType")
    assert bad.next_run_at is not None and bad.next_run_at > timezone.now()


def test_a_failing_action_s_writes_roll_back_and_a_quiet_action_takes_no_savepoint(
    postgres: None,
) -> None:
    saga_start(saga_type="test-half", saga_id="half")
    saga_start(saga_type="test-quiet", saga_id="quiet")

    with CaptureQueriesContext(connection) as ctx:
        Worker(batch=5).drain()

    assert SagaRun.objects.get(saga_id="half").status == "failed"
    assert not OutboxMessage.objects.filter(type="test.half").exists()
    assert SagaRun.objects.get(saga_id="quiet").status == "completed"
    # one savepoint, the half-writing action's (then rolled back); none for the quiet ones
    assert _statements(ctx, "ROLLBACK TO SAVEPOINT") == 1
    assert _statements(ctx, "SAVEPOINT") - _statements(ctx, "ROLLBACK TO SAVEPOINT") == 1


def test_kept_steps_are_read_again_when_another_writer_moved_the_run(postgres: None) -> None:
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]  # a retry would follow
    saga_start(saga_type="test-order", saga_id="kept")
    claims = runs_claim(owner="w", limit=1)
    kept: StepsKept = {}
    runs_advance(claims, kept=kept)  # create_order done
    with CaptureQueriesContext(connection) as ctx:
        runs_advance(claims, kept=kept)  # charge_payment failed once; steps kept at version 3
    assert _statements(ctx, 'FROM "orchestrator_steprun"') == 0  # the kept ones were used
    run = SagaRun.objects.get(saga_id="kept")
    assert kept[run.pk][0] == run.version == 3
    claims = runs_claim(owner="w", limit=1)  # the retry waited: the run was handed back

    # another writer (a reply, say) changes a step while the worker holds the run: like
    # every writer of step rows, through transition_save, which bumps the version
    with transaction.atomic():
        locked = SagaRun.objects.select_for_update().get(pk=run.pk)
        steps = list(StepRun.objects.filter(run=locked).order_by("position"))
        before = steps_snapshot(steps)
        steps[1].status = "skipped"
        transition_save(locked, steps, before, Telemetry(locked, "order"))
    with CaptureQueriesContext(connection) as ctx:
        runs_advance(claims, kept=kept)  # must see the skip: reserve_stock next, no retry
    assert _statements(ctx, 'FROM "orchestrator_steprun"') == 1

    statuses = dict(StepRun.objects.filter(run=run).values_list("name", "status"))
    assert statuses["charge_payment"] == "skipped"
    assert statuses["reserve_stock"] == "succeeded"
    assert sagas.CALLS["forward:charge_payment"] == 1


def test_sagas_start_starts_many_in_one_transaction_and_is_idempotent(postgres: None) -> None:
    saga_start(saga_type="test-order", saga_id="many-1", data={"first": True})
    with CaptureQueriesContext(connection) as ctx:
        runs = sagas_start(
            saga_type="test-order",
            sagas=[("many-2", {"n": 2}), ("many-1", {"n": 1}), ("many-3", None), ("many-2", {})],
        )

    assert [r.saga_id for r in runs] == ["many-2", "many-1", "many-3", "many-2"]
    assert runs[0] is runs[3]  # given twice: one saga, the first data
    assert SagaRun.objects.get(saga_id="many-2").data == {"n": 2}
    assert SagaRun.objects.get(saga_id="many-1").data == {"first": True}  # it existed
    assert _statements(ctx, 'INSERT INTO "orchestrator_sagarun"') == 1
    started = TelemetryEvent.objects.filter(type="saga.started")
    assert sorted(started.values_list("saga_id", flat=True)) == ["many-1", "many-2", "many-3"]
    assert set(SagaRun.objects.values_list("report_seq", flat=True)) == {1}
    assert StepRun.objects.filter(run__saga_id="many-3").count() == 4
    Worker(batch=10).drain()
    assert set(SagaRun.objects.values_list("status", flat=True)) == {"completed"}


@pytest.mark.parametrize(
    ("pairs", "field"),
    [
        ([("fine", {}), ("", {})], "sagas[1].saga_id"),
        ([("fine", {}), ("x", [1, 2])], "sagas[1].data"),
        ([("fine", {}), ("fine", "not an object")], "sagas[1].data"),  # a repeat is checked too
        ([("fine", {}), ("x",)], "sagas[1]"),
        ([("fine", {}), ("other-type", {})], "sagas[1].saga_id"),
    ],
)
def test_sagas_start_refuses_them_all_naming_the_bad_one(
    pairs: list[tuple[Any, ...]], field: str
) -> None:
    saga_start(saga_type="test-quiet", saga_id="other-type")
    with pytest.raises(StartRefused) as refused:
        sagas_start(saga_type="test-order", sagas=pairs)
    assert refused.value.field == field
    assert list(SagaRun.objects.values_list("saga_id", flat=True)) == ["other-type"]


def _held_elsewhere(work: Callable[[], object], until: threading.Event) -> threading.Thread:
    """Another connection runs ``work`` in a transaction and commits only once
    ``until`` is set (or after 30 s)."""
    holding = threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                work()
                holding.set()
                until.wait(30)
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    return thread


def _started_elsewhere(saga_type: str, saga_id: str, until: threading.Event) -> threading.Thread:
    """Another connection starts ``saga_id`` and commits only once ``until`` is set."""
    return _held_elsewhere(lambda: saga_start(saga_type=saga_type, saga_id=saga_id), until)


def _commit_when_blocked(until: threading.Event) -> threading.Thread:
    """Set ``until`` once this test's connection waits for a lock (it met the other insert)."""

    def watch() -> None:
        try:
            pg_activity_wait("wait_event_type = 'Lock' AND datname = current_database()")
        finally:
            until.set()
            connections.close_all()

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_sagas_start_racing_another_start_of_the_same_id(postgres: None) -> None:
    need(connection.vendor == "postgresql", "two connections at once")
    until = threading.Event()
    other = _started_elsewhere("test-order", "race-1", until)
    watcher = _commit_when_blocked(until)

    with CaptureQueriesContext(connection) as ctx:
        runs = sagas_start(saga_type="test-order", sagas=[("race-1", {}), ("race-2", {})])
    other.join()
    watcher.join()

    # one insert: it waited for the other start of race-1, then skipped that id
    assert _statements(ctx, 'INSERT INTO "orchestrator_sagarun"') == 1
    assert [r.saga_id for r in runs] == ["race-1", "race-2"]
    assert runs[0].pk == SagaRun.objects.get(saga_id="race-1").pk  # the other start's run
    assert SagaRun.objects.filter(saga_id__startswith="race-").count() == 2
    assert TelemetryEvent.objects.filter(type="saga.started").count() == 2  # one each


@pytest.mark.parametrize(
    ("start", "field"),
    [
        (lambda: saga_start(saga_type="test-order", saga_id="race-1"), "saga_id"),
        (
            lambda: sagas_start(saga_type="test-order", sagas=[("race-2", {}), ("race-1", {})]),
            "sagas[1].saga_id",
        ),
    ],
    ids=["one", "several"],
)
def test_a_racing_start_of_another_saga_type_is_refused(
    postgres: None, start: Any, field: str
) -> None:
    need(connection.vendor == "postgresql", "two connections at once")
    until = threading.Event()
    other = _started_elsewhere("test-quiet", "race-1", until)
    watcher = _commit_when_blocked(until)

    with pytest.raises(StartRefused) as refused:
        start()
    other.join()
    watcher.join()

    assert refused.value.field == field
    assert list(SagaRun.objects.values_list("saga_type", flat=True)) == ["test-quiet"]


def test_an_action_whose_statement_failed_fails_its_step_and_the_round_goes_on(
    postgres: None,
) -> None:
    saga_start(saga_type="test-dup", saga_id="dup")
    saga_start(saga_type="test-quiet", saga_id="fine")

    Worker(batch=2).drain()

    assert SagaRun.objects.get(saga_id="dup").status == "failed"
    assert "IntegrityError" in str(SagaRun.objects.get(saga_id="dup").last_error)
    assert not Service.objects.filter(name="dup").exists()  # rolled back with the step
    assert SagaRun.objects.get(saga_id="fine").status == "completed"


def test_a_lock_conflict_in_an_action_is_not_its_failure_and_spares_the_others(
    postgres: None,
) -> None:
    need(connection.vendor == "postgresql", "two connections at once")
    Service.objects.create(name="locked")
    release = threading.Event()
    thread = _held_elsewhere(
        lambda: Service.objects.select_for_update().get(name="locked"), release
    )
    try:
        saga_start(saga_type="test-locked", saga_id="blocked")
        saga_start(saga_type="test-quiet", saga_id="free")
        Worker(batch=2).drain()
    finally:
        release.set()
        thread.join()

    blocked = SagaRun.objects.get(saga_id="blocked")
    assert blocked.status == "running"  # no attempt spent: set aside, tried again later
    assert blocked.waiting.startswith("lock conflict, retried in 1 s: OperationalError")
    assert blocked.next_run_at is not None
    assert blocked.next_run_at <= timezone.now() + timedelta(seconds=1)  # soon, not in a minute
    assert StepRun.objects.get(run=blocked).attempt == 0
    assert SagaRun.objects.get(saga_id="free").status == "completed"
