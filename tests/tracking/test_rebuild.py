"""Incremental ingest and ``rebuild_read_model`` reach the same read model."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from django.core.management import call_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import Saga, SagaCount, Step, StepStat
from tracking.projection import fold
from tracking.read_model import (
    SAGA_FIELDS,
    STEP_FIELDS,
    read_model_rebuild,
    skew_threshold,
    stored_events_get,
)
from tracking.rollups import rollup_compact

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
TYPES = [
    "saga.started",
    "step.started",
    "step.succeeded",
    "step.failed",
    "compensation.started",
    "compensation.succeeded",
    "compensation.failed",
    "saga.completed",
    "saga.compensated",
    "saga.compensation_failed",
    "heartbeat",
    "tx.prepared",
]


def rollup_totals() -> tuple[dict[Any, int], dict[Any, tuple[int, int]]]:
    sagas = {
        (c.bucket, c.saga_type, c.status, c.flags): c.count
        for c in SagaCount.objects.all()
        if c.count
    }
    steps = {
        (s.bucket, s.saga_type, s.step, s.bin): (s.count, s.failures)
        for s in StepStat.objects.all()
        if s.count or s.failures
    }
    return sagas, steps


def snapshot(saga_ids: list[str]) -> dict[str, Any]:
    out = {}
    for saga in Saga.objects.filter(saga_id__in=saga_ids).prefetch_related("steps"):
        out[saga.saga_id] = {
            **{f: getattr(saga, f) for f in SAGA_FIELDS},
            "steps": sorted(
                [
                    {"name": s.name, **{f: getattr(s, f) for f in STEP_FIELDS}}
                    for s in saga.steps.all()
                ],
                key=lambda s: s["name"],
            ),
        }
    return out


event_dict = st.fixed_dictionaries(
    {
        "n": st.integers(0, 30),
        "type": st.sampled_from(TYPES),
        "saga": st.sampled_from(["a", "b", "c"]),
        "step": st.sampled_from(["charge", "ship"]),
        "service": st.sampled_from(["order", "payment"]),
        "seq": st.one_of(st.none(), st.integers(0, 9)),
        "offset": st.sampled_from(["Z", "+02:00"]),
    }
)


def to_protocol(d: dict[str, Any], prefix: str) -> tuple[str, dict[str, Any]]:
    tz = UTC if d["offset"] == "Z" else __import__("datetime").timezone(timedelta(hours=2))
    at = (T0 + timedelta(seconds=d["n"] % 11, microseconds=d["n"])).astimezone(tz)
    event: dict[str, Any] = {
        "id": f"{prefix}-{d['type']}-{d['n']}-{d['saga']}-{d['step']}",
        "saga_id": f"{prefix}-{d['saga']}",
        "type": d["type"],
        "occurred_at": at.isoformat(),
        "step": d["step"],
        "attributes": {"n": d["n"] % 3},
    }
    if d["type"] == "saga.started":
        event["saga_type"] = "order"
    if d["seq"] is not None:
        event["sequence"] = d["seq"]
    if d["type"].endswith("failed"):
        event["error"] = {"type": "Boom", "message": str(d["n"])}
    return d["service"], event


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    drawn=st.lists(
        event_dict,
        min_size=1,
        max_size=25,
        unique_by=lambda d: (d["service"], d["type"], d["n"], d["saga"], d["step"]),
    ),
    data=st.data(),
)
@pytest.mark.django_db
@pytest.mark.parametrize("kept", [False, True], ids=["refolded", "folds-kept"])
def test_incremental_ingest_in_any_batches_equals_rebuild_and_fold(  # type: ignore[no-untyped-def]
    drawn, data, kept, django_capture_on_commit_callbacks
) -> None:
    """``kept``: each batch commits (its on-commit hooks run), so the process keeps the
    folds it wrote and later batches extend them (tracking/fold_cache.py)."""
    prefix = uuid.uuid4().hex[:8]
    reports = [to_protocol(d, prefix) for d in drawn]
    # given the events arrive shuffled, in random batches, with duplicates, at random times
    shuffled = data.draw(st.permutations(reports))
    shuffled += data.draw(st.lists(st.sampled_from(reports), max_size=5))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(shuffled)), max_size=4)))
    services = {name: service_get_or_create(name=name) for name in ("order", "payment")}
    received = T0
    for start, end in zip([0, *cuts], [*cuts, len(shuffled)], strict=True):
        for service_name in ("order", "payment"):
            batch = [e for s, e in shuffled[start:end] if s == service_name]
            if batch:
                received += timedelta(seconds=data.draw(st.sampled_from([1, 90])))
                raws = [msgspec.json.encode(e) for e in batch]
                with django_capture_on_commit_callbacks(execute=kept):
                    result = events_ingest(
                        service=services[service_name], raws=raws, received_at=received
                    )
                assert {r.status for r in result.results} <= {"accepted", "duplicate"}, (
                    result.results
                )
    saga_ids = sorted({e["saga_id"] for _, e in reports})
    incremental = snapshot(saga_ids)
    versions = dict(Saga.objects.filter(saga_id__in=saga_ids).values_list("saga_id", "version"))
    # then the rows equal a fold of the stored events
    stored = stored_events_get(saga_ids=saga_ids)
    for saga_id in saga_ids:
        state = fold(saga_id, stored[saga_id], skew_threshold=skew_threshold())
        assert incremental[saga_id]["status"] == state.status
        assert incremental[saga_id]["event_count"] == len(
            {(e.service, e.event_id) for e in stored[saga_id]}
        )
    rollup_compact()
    rollups = rollup_totals()
    assert (
        sum(n for (_, _, _, _), n in rollups[0].items())
        == Saga.objects.filter(event_count__gt=0).count()
    )
    # and a rebuild changes nothing, not even versions or the rollups
    counts = read_model_rebuild()
    assert rollup_totals() == rollups
    assert counts["changed"] == 0
    assert snapshot(saga_ids) == incremental
    assert (
        dict(Saga.objects.filter(saga_id__in=saga_ids).values_list("saga_id", "version"))
        == versions
    )
    # and a rebuild from nothing recreates the same rows
    Saga.objects.filter(saga_id__in=saga_ids).delete()
    read_model_rebuild()
    assert snapshot(saga_ids) == incremental


def test_rebuild_command_for_one_saga_repairs_a_damaged_row(api, make_event) -> None:
    api.batch(
        [
            make_event("saga.started", saga_id="x"),
            make_event("saga.completed", saga_id="x"),
            make_event("saga.started", saga_id="y"),
        ]
    )
    Saga.objects.filter(saga_id="x").update(status="running", current_step="bogus")
    Step.objects.all().delete()
    before_y = Saga.objects.get(saga_id="y").version
    out = io.StringIO()
    call_command("rebuild_read_model", "--saga", "x", stdout=out)
    assert "1 saga(s): 1 changed" in out.getvalue()
    repaired = Saga.objects.get(saga_id="x")
    assert repaired.status == "completed"
    assert repaired.current_step == ""
    assert Saga.objects.get(saga_id="y").version == before_y


def test_rebuild_command_over_everything_reports_counts(api, make_event) -> None:
    api.batch([make_event("saga.started", saga_id=f"s{i}") for i in range(3)])
    out = io.StringIO()
    call_command("rebuild_read_model", stdout=out)
    assert out.getvalue().strip() == "Rebuilt 3 saga(s): 0 changed, 0 without events removed."


def test_rebuild_queries_do_not_grow_with_the_number_of_sagas(api) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    api.batch(
        [
            {
                "id": f"n{i}",
                "saga_id": f"n{i}",
                "type": "step.started",
                "step": "a",
                "occurred_at": "2026-11-26T10:00:00Z",
            }
            for i in range(30)
        ]
    )
    with CaptureQueriesContext(connection) as queries:
        read_model_rebuild()
    assert len(queries.captured_queries) < 30  # no query per saga
