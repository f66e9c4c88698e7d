"""Ingest keeps the folds it wrote (tracking/fold_cache.py): later events of a saga
extend them instead of re-reading the saga's stored events, with the same rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import msgspec
import pytest
from django.db import connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from tests.conftest import T0
from tests.tracking.test_rebuild import rollup_totals
from tracking.fold_cache import FoldCache, folds
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import Saga, Service, Step, TelemetryEvent
from tracking.read_model import read_model_rebuild
from tracking.rollups import rollup_compact, rollups_rebuild

pytestmark = pytest.mark.django_db

STEPS = ("order", "payment", "stock")


def saga_events(saga_id: str, start: int = 0) -> list[dict[str, Any]]:
    """The eight events of a saga whose three steps succeed, in the order they happen."""
    kinds = [
        ("saga.started", ""),
        *((f"step.{phase}", step) for step in STEPS for phase in ("started", "succeeded")),
        ("saga.completed", ""),
    ]
    out = []
    for n, (kind, step) in enumerate(kinds):
        event: dict[str, Any] = {
            "id": f"{saga_id}-{n}",
            "saga_id": saga_id,
            "type": kind,
            "occurred_at": (T0 + timedelta(seconds=start + 10 * n)).isoformat(),
            "sequence": start + n,
        }
        if kind == "saga.started":
            event["saga_type"] = "order"
        if step:
            event["step"] = step
        out.append(event)
    return out


@pytest.fixture
def report(
    django_capture_on_commit_callbacks: Any,
) -> Iterator[Callable[..., list[str]]]:
    """Ingest events as the payment service in a transaction that commits (its
    on-commit hooks run); return the SQL it ran against the event table."""
    service = service_get_or_create(name="payment")

    def report(*events: dict[str, Any], service: Service = service) -> list[str]:
        with (
            CaptureQueriesContext(connection) as queries,
            django_capture_on_commit_callbacks(execute=True),
        ):
            result = events_ingest(
                service=service,
                raws=[msgspec.json.encode(e) for e in events],
                received_at=T0 + timedelta(seconds=100),
            )
        assert result.count("accepted") == len(events), result.results
        table = TelemetryEvent._meta.db_table
        sql = [q["sql"] or "" for q in queries]
        return [q for q in sql if table in q and "INSERT" not in q]

    yield report


def assert_rebuild_changes_nothing(saga_id: str) -> None:
    before = Saga.objects.get(saga_id=saga_id)
    assert read_model_rebuild(saga_id=saga_id)["changed"] == 0
    assert Saga.objects.get(saga_id=saga_id).version == before.version


def test_a_sagas_next_events_extend_the_kept_fold_without_reading_the_store(report) -> None:
    # given a saga reported event by event, each in its own transaction
    events = saga_events("s1")
    reads = [report(e) for e in events]
    # then after the first, no batch read the saga's stored events back
    assert reads[1:] == [[]] * 7
    # and the rows are those a rebuild from the store gives
    saga = Saga.objects.get(saga_id="s1")
    assert (saga.status, saga.event_count, saga.version) == ("completed", 8, 8)
    assert sorted(Step.objects.filter(saga=saga).values_list("name", "status")) == [
        (step, "succeeded") for step in sorted(STEPS)
    ]
    assert_rebuild_changes_nothing("s1")


def test_a_version_bumped_elsewhere_makes_ingest_read_the_store(report) -> None:
    events = saga_events("s1")
    report(*events[:3])
    # when something else changes the saga row (the detector, an operator action)
    Saga.objects.filter(saga_id="s1").update(version=F("version") + 1)
    # then the next batch re-reads the stored events, and later ones extend again
    assert report(events[3]) != []
    assert report(events[4]) == []
    assert Saga.objects.get(saga_id="s1").event_count == 5
    assert_rebuild_changes_nothing("s1")


def test_a_late_event_that_sorts_earlier_is_folded_from_the_store(report) -> None:
    events = saga_events("s1")
    report(*events[:2], *events[3:6])
    # when the event that sorts between the stored ones arrives late
    assert report(events[2]) != []
    saga = Saga.objects.get(saga_id="s1")
    assert saga.event_count == 6
    assert Step.objects.get(saga=saga, name="order").status == "succeeded"
    assert_rebuild_changes_nothing("s1")


def test_a_transaction_that_rolls_back_keeps_no_fold(report) -> None:
    events = saga_events("s1")
    report(events[0])
    assert "s1" in folds
    service = Service.objects.get(name="payment")
    # when a batch's transaction is rolled back after ingest
    with pytest.raises(RuntimeError), transaction.atomic():
        events_ingest(service=service, raws=[msgspec.json.encode(events[1])])
        raise RuntimeError("the caller's transaction fails")
    # then the fold is gone (the one it took was not put back), and the next batch
    # folds from the store
    assert "s1" not in folds
    assert report(events[1]) != []
    assert Saga.objects.get(saga_id="s1").event_count == 2
    assert_rebuild_changes_nothing("s1")


def test_a_kept_fold_whose_rows_are_gone_gets_its_saga_created_again(report) -> None:
    report(*saga_events("s1")[:2])
    assert "s1" in folds
    # when the database is emptied under the running process
    Saga.objects.all().delete()
    TelemetryEvent.objects.all().delete()
    # then the saga's next report creates its row from what is stored now
    report(saga_events("s1")[3])
    saga = Saga.objects.get(saga_id="s1")
    assert (saga.event_count, saga.version, saga.current_step) == (1, 1, "payment")


def test_with_the_cache_off_every_batch_reads_the_store(report, monkeypatch) -> None:
    monkeypatch.setattr(folds, "size", 0)
    events = saga_events("s1")
    reads = [report(e) for e in events[:3]]
    assert len(folds) == 0
    assert all(reads[1:])
    assert Saga.objects.get(saga_id="s1").event_count == 3
    assert_rebuild_changes_nothing("s1")


def test_the_least_recently_kept_fold_is_evicted_first() -> None:
    cache = FoldCache(2)
    a, b, c = (object() for _ in range(3))
    cache.keep([("a", 1, 1, a), ("b", 2, 1, b)])  # type: ignore[list-item]
    cache.keep([("a", 1, 2, a)])  # type: ignore[list-item]
    cache.keep([("c", 3, 1, c)])  # type: ignore[list-item]
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
    # a fold is handed out only for the row and version it was kept at, and only once
    assert cache.take("a", 1, 1) is None
    assert "a" not in cache
    assert cache.take("c", 99, 1) is None
    cache.keep([("c", 3, 1, c)])  # type: ignore[list-item]
    assert cache.take("c", 3, 1) is c
    assert cache.take("c", 3, 1) is None


def test_a_kept_fold_whose_saga_row_was_deleted_by_hand_is_refolded_from_the_store(
    report,
) -> None:
    events = saga_events("s1")
    report(*events[:2])
    assert "s1" in folds
    # when someone deletes the saga's row (its events stay)
    Saga.objects.filter(saga_id="s1").delete()
    # then its next report inserts the row again (with the new sagas, in saga-id
    # order) and folds every stored event into it
    assert report(events[2]) != []
    saga = Saga.objects.get(saga_id="s1")
    assert (saga.event_count, saga.version) == (3, 1)
    assert Step.objects.get(saga=saga, name="order").status == "succeeded"
    assert_rebuild_changes_nothing("s1")
    # and the fold is kept again for the saga's next events
    assert report(events[3]) == []


def test_a_saga_type_reported_late_moves_every_steps_rollup_contribution(report) -> None:
    """Extending a kept fold writes the rollup deltas of the steps the new events name;
    a saga type that arrives later moves every step's contribution to it."""
    # given a saga whose first step finished before anything named its type
    events = saga_events("s1")
    untyped = [dict(e) for e in events[1:5]]  # order and payment: started, succeeded
    report(*untyped)
    typed = dict(events[5], saga_type="order")  # stock started, naming the type
    # when the next event names the saga's type (its fold is kept and extended)
    assert report(typed) == []
    # then the step statistics are those a rebuild computes from the rows
    rollup_compact()
    incremental = rollup_totals()
    rollups_rebuild()
    rollup_compact()
    assert rollup_totals() == incremental
    assert {k[1] for k in incremental[1]} == {"order"}
