"""Concurrent batches on the same sagas: no deadlock, no lost event, state = fold (PostgreSQL)."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from django.db import connections
from django.test import Client

from tests.tracking.test_rebuild import rollup_totals
from tracking.models import Saga, TelemetryEvent
from tracking.read_model import read_model_rebuild
from tracking.rollups import rollup_compact

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
STEPS = ["order", "payment", "stock", "shipping"]


def saga_stream(saga_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {
            "id": f"{saga_id}:start",
            "saga_id": saga_id,
            "type": "saga.started",
            "saga_type": "order",
            "occurred_at": T0.isoformat(),
            "sequence": 0,
        },
    ]
    for i, step in enumerate(STEPS):
        for j, kind in enumerate(("step.started", "step.succeeded")):
            seq = 1 + 2 * i + j
            events.append(
                {
                    "id": f"{saga_id}:{step}:{kind}",
                    "saga_id": saga_id,
                    "type": kind,
                    "step": step,
                    "sequence": seq,
                    "occurred_at": (T0 + timedelta(seconds=seq)).isoformat(),
                }
            )
    events.append(
        {
            "id": f"{saga_id}:done",
            "saga_id": saga_id,
            "type": "saga.completed",
            "occurred_at": (T0 + timedelta(seconds=20)).isoformat(),
            "sequence": 99,
        }
    )
    return events


@pytest.mark.django_db(transaction=True)
def test_overlapping_concurrent_batches_for_the_same_sagas(postgres, service_key) -> None:
    # given 20 sagas whose events 6 threads report in overlapping, shuffled batches
    sagas = [f"conc-{i}" for i in range(20)]
    every = [e for s in sagas for e in saga_stream(s)]
    rng = random.Random(7)
    plans = []
    for _ in range(6):
        mine = rng.sample(every, k=len(every) * 2 // 3)  # overlaps with other threads
        plans.append([mine[i : i + 25] for i in range(0, len(mine), 25)])
    covered = {e["id"] for plan in plans for batch in plan for e in batch}
    missing = [e for e in every if e["id"] not in covered]
    plans[0].append(missing)
    statuses: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(plans))

    def worker(plan: list[list[dict[str, Any]]]) -> None:
        try:
            client = Client()
            barrier.wait()
            for batch in plan:
                if not batch:
                    continue
                response = client.post(
                    "/api/v1/events",
                    data=msgspec.json.encode({"events": batch}),
                    content_type="application/json",
                    HTTP_AUTHORIZATION=f"Bearer {service_key.secret}",
                )
                statuses.append(response.status_code)
                body = response.json()
                assert body["rejected"] == 0, body
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # then nothing failed or deadlocked, every event is stored exactly once
    assert not errors, errors
    assert set(statuses) == {200}
    assert TelemetryEvent.objects.count() == len(every)
    # and every saga is complete with all its events, matching a rebuild from the store
    for saga in Saga.objects.filter(saga_id__in=sagas):
        assert saga.status == "completed", saga.saga_id
        assert saga.event_count == len(STEPS) * 2 + 2
        assert saga.steps.filter(status="succeeded").count() == len(STEPS)
    # and the rollups the batches appended add up to what a rebuild computes
    rollup_compact()
    appended = rollup_totals()
    assert sum(appended[0].values()) == len(sagas)
    assert read_model_rebuild()["changed"] == 0
    assert rollup_totals() == appended
