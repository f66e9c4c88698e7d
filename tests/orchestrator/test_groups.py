"""Group commits: a worker advances its claimed runs one transition each per transaction;
sagas start many at once; an action's savepoint is taken only when it writes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import outbox
from orchestrator import RetryPolicy, Step, StepFailed, saga_define, sagas_start
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
from tests.conftest import need
from tests.orchestrator import sagas
from tracking.models import Saga, TelemetryEvent

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
saga_define("test-quiet", service="order", steps=[Step(n, action=_nothing) for n in ("a", "b")])


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


def test_a_group_gives_the_same_result_as_one_run_at_a_time(postgres: None) -> None:
    sagas.SCRIPT["forward:reserve_stock"] = ["fail", "ok"]  # one retry on the way
    sagas_start(saga_type="test-order", sagas=[(f"same-{i}", {"i": i}) for i in range(4)])
    Worker(batch=4).drain()

    for i in range(4):
        run = SagaRun.objects.get(saga_id=f"same-{i}")
        assert run.status == "completed"
        assert Saga.objects.get(saga_id=f"same-{i}").status == "completed"
    effects = Counter(
        m.payload["key"] if isinstance(m.payload, dict) else m.payload
        for m in OutboxMessage.objects.filter(type="test.effect")
    )
    assert len(effects) == 16 and set(effects.values()) == {1}


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
    runs_advance(claims, kept=kept)  # charge_payment failed once; steps kept at version 3
    run = SagaRun.objects.get(saga_id="kept")
    assert kept[run.pk][0] == run.version == 3

    # another writer (a reply, say) changes a step while the worker holds the run: like
    # every writer of step rows, through transition_save, which bumps the version
    with transaction.atomic():
        locked = SagaRun.objects.select_for_update().get(pk=run.pk)
        steps = list(StepRun.objects.filter(run=locked).order_by("position"))
        before = steps_snapshot(steps)
        steps[1].status = "skipped"
        transition_save(locked, steps, before, Telemetry(locked, "order"))
    runs_advance(claims, kept=kept)  # must see the skip: reserve_stock next, no retry

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
        ([("fine", {}), ("other-type", {})], "sagas[1].saga_id"),
    ],
)
def test_sagas_start_refuses_them_all_naming_the_bad_one(
    pairs: list[tuple[str, Any]], field: str
) -> None:
    saga_start(saga_type="test-quiet", saga_id="other-type")
    with pytest.raises(StartRefused) as refused:
        sagas_start(saga_type="test-order", sagas=pairs)
    assert refused.value.field == field
    assert not SagaRun.objects.filter(saga_id="fine").exists()


def test_sagas_start_racing_another_start_of_the_same_id(postgres: None) -> None:
    need(connection.vendor == "postgresql", "two connections at once")
    inserted = threading.Event()

    def other_starter() -> None:
        try:
            with transaction.atomic():
                saga_start(saga_type="test-order", saga_id="race-1")
                inserted.set()
                time.sleep(0.5)  # the other start waits on the unique key meanwhile
        finally:
            connections.close_all()

    thread = threading.Thread(target=other_starter)
    thread.start()
    assert inserted.wait(10)
    runs = sagas_start(saga_type="test-order", sagas=[("race-1", {}), ("race-2", {})])
    thread.join()

    assert [r.saga_id for r in runs] == ["race-1", "race-2"]
    assert SagaRun.objects.filter(saga_id__startswith="race-").count() == 2
    assert TelemetryEvent.objects.filter(type="saga.started").count() == 2  # one each
