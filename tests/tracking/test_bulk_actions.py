"""Bulk actions: 500 sagas by filter, preview, progress, cancel half-way, per-saga results."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from outbox.models import OutboxMessage
from tests.conftest import role_group
from tracking.actions import ActionError
from tracking.bulk_actions import bulk_cancel, bulk_preview, bulk_start, bulk_work
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import AuditEntry, BulkItem, BulkJob, OperatorAction

pytestmark = pytest.mark.django_db


def operator() -> Any:
    user = get_user_model().objects.create_user("olga", password="x")
    user.groups.add(role_group("operator"))
    return get_user_model().objects.get(pk=user.pk)


def failed_sagas(n: int, *, prefix: str = "bulk") -> None:
    now = timezone.now().isoformat()
    raws = []
    for i in range(n):
        for j, event in enumerate(
            [
                {"type": "saga.started", "saga_type": "order"},
                {"type": "step.failed", "step": "charge", "error": {"type": "Declined"}},
                {"type": "saga.failed"},
            ]
        ):
            body = {"id": f"{prefix}-{i}-{j}", "saga_id": f"{prefix}-{i}", "occurred_at": now}
            raws.append(json.dumps({**body, **event}).encode())
    for start in range(0, len(raws), 900):
        with transaction.atomic():
            events_ingest(
                service=service_get_or_create(name="payment"), raws=raws[start : start + 900]
            )


def test_a_bulk_compensation_of_500_sagas_with_progress_and_a_cancel_half_way() -> None:
    failed_sagas(500)
    failed_sagas(3, prefix="other")  # not matched: another type
    filters = {"status": "failed", "saga_id": "bulk-"}
    preview = bulk_preview(filters=filters)
    assert preview.count == 500 and len(preview.sample) == 10
    assert all(s.startswith("bulk-") for s in preview.sample)

    job = bulk_start(
        action="compensate",
        filters=filters,
        reason="payment provider outage",
        user=operator(),
        expected_count=500,
        rate=0,
    )
    assert (job.total, job.status) == (500, "running")

    assert bulk_work(limit=250) == 250
    job.refresh_from_db()
    assert (job.succeeded, job.failed, job.processed) == (250, 0, 250)
    bulk_cancel(job_id=job.pk, user=operator_again())
    assert bulk_work() == 0  # nothing more goes out

    job.refresh_from_db()
    assert job.status == "cancelled" and job.finished_at is not None
    counts = dict(
        BulkItem.objects.filter(job=job)
        .values_list("status")
        .annotate(n=__import__("django.db.models", fromlist=["Count"]).Count("id"))
    )
    assert counts == {"done": 250, "cancelled": 250}
    done = BulkItem.objects.filter(job=job, status="done").first()
    assert done is not None and done.result["status"] == "dispatched"
    assert OutboxMessage.objects.filter(type="payment.compensate").count() == 250
    assert OperatorAction.objects.filter(action="compensate").count() == 250
    entry = AuditEntry.objects.filter(saga_id=done.saga_id).get()
    assert entry.reason == f"payment provider outage (bulk job {job.pk})"


def operator_again() -> Any:
    return get_user_model().objects.get(username="olga")


def test_refused_sagas_are_per_saga_failures_not_the_jobs() -> None:
    failed_sagas(3)
    job = bulk_start(
        action="cancel", filters={"saga_id": "bulk-"}, reason="tidy", user=operator(), rate=0
    )
    assert bulk_work() == 3
    job.refresh_from_db()
    assert (job.succeeded, job.failed, job.status) == (0, 3, "done")
    item = BulkItem.objects.filter(job=job).first()
    assert item is not None and item.status == "failed"
    assert "cannot cancel a saga that is failed" in item.result["message"]


def test_the_count_confirmed_must_still_hold_and_a_viewer_may_not() -> None:
    failed_sagas(4)
    with pytest.raises(ActionError, match="matches 4 sagas now, not 3") as caught:
        bulk_start(
            action="compensate",
            filters={"saga_id": "bulk-"},
            reason="x",
            user=operator(),
            expected_count=3,
        )
    assert caught.value.status == 409
    viewer = get_user_model().objects.create_user("vic", password="x")
    viewer.groups.add(role_group("viewer"))
    with pytest.raises(ActionError, match="your role may not"):
        bulk_start(
            action="compensate",
            filters={},
            reason="x",
            user=get_user_model().objects.get(pk=viewer.pk),
        )
    assert BulkJob.objects.count() == 0


def test_a_big_job_waits_for_a_second_operator(settings: Any) -> None:
    from tracking.bulk_actions import bulk_approve

    settings.SAGAADMIN = {**settings.SAGAADMIN, "TWO_PERSON_BULK_ABOVE": 2}
    failed_sagas(3)
    job = bulk_start(
        action="compensate", filters={"saga_id": "bulk-"}, reason="outage", user=operator(), rate=0
    )
    assert job.status == "awaiting_approval"
    assert bulk_work() == 0  # not before the approval
    with pytest.raises(ActionError, match="a second person must approve"):
        bulk_approve(job_id=job.pk, user=operator_again())
    second = get_user_model().objects.create_user("otto", password="x")
    second.groups.add(role_group("operator"))
    bulk_approve(job_id=job.pk, user=get_user_model().objects.get(pk=second.pk))
    assert bulk_work() == 3
    job.refresh_from_db()
    assert (job.status, job.succeeded, job.approved_by) == ("done", 3, "otto")
