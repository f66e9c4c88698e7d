"""Bulk actions and two-person approvals over the API."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.test import Client
from django.utils import timezone

from tests.tracking.test_bulk_actions import failed_sagas
from tracking.bulk_actions import bulk_work
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import BulkJob, OperatorAction

pytestmark = pytest.mark.django_db


def post(client: Client, url: str, body: Any = None) -> Any:
    return client.post(url, body or {}, content_type="application/json")


def test_preview_start_progress_and_cancel(role_client: Any) -> None:
    failed_sagas(5)
    operator = role_client("operator")
    preview = post(operator, "/api/v1/bulk-actions/preview", {"filters": {"saga_id": "bulk-"}})
    assert preview.status_code == 200 and preview.json()["count"] == 5

    started = post(
        operator,
        "/api/v1/bulk-actions",
        {
            "action": "compensate",
            "filters": {"saga_id": "bulk-"},
            "reason": "outage",
            "expected_count": 5,
            "rate": 0,
        },
    )
    assert started.status_code == 202
    job = started.json()
    assert started["Location"] == f"/api/v1/bulk-actions/{job['id']}"
    assert (job["total"], job["processed"], job["status"]) == (5, 0, "running")

    bulk_work(limit=2)
    progress = operator.get(started["Location"]).json()
    assert (progress["processed"], progress["succeeded"]) == (2, 2)
    assert [i["status"] for i in progress["items"]].count("done") == 2

    cancelled = post(operator, f"/api/v1/bulk-actions/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = post(operator, f"/api/v1/bulk-actions/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "status"


def test_a_changed_count_and_a_bad_filter_are_named(role_client: Any) -> None:
    failed_sagas(2)
    operator = role_client("operator")
    changed = post(
        operator,
        "/api/v1/bulk-actions",
        {
            "action": "compensate",
            "filters": {"saga_id": "bulk-"},
            "reason": "x",
            "expected_count": 3,
        },
    )
    assert changed.status_code == 409
    assert changed.json()["current_count"] == 2
    bad = post(operator, "/api/v1/bulk-actions/preview", {"filters": {"status": "exploded"}})
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "filters.status"
    # a misspelt or unknown filter key would have matched every saga: refused, named
    for filters in ({"stauts": "failed"}, {"sort": "bogus"}, {"limit": "abc"}):
        bad = post(operator, "/api/v1/bulk-actions/preview", {"filters": filters})
        assert bad.status_code == 400, filters
        assert bad.json()["errors"][0]["field"] == f"filters.{next(iter(filters))}"
    bad = post(
        operator,
        "/api/v1/bulk-actions",
        {
            "action": "compensate",
            "filters": {"stauts": "failed"},
            "reason": "x",
            "expected_count": 2,
        },
    )
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "filters.stauts"
    # so is a misspelt top-level key ("filter" for "filters" matched every saga)
    bad = post(operator, "/api/v1/bulk-actions/preview", {"filter": {"saga_id": "bulk-"}})
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "filter"
    # times out of range are named too (they were a 500)
    bad = post(
        operator,
        "/api/v1/bulk-actions/preview",
        {"filters": {"started_after": "9999-12-31T23:59:59-23:59"}},
    )
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["field"] == "filters.started_after"
    viewer = post(
        role_client("viewer"),
        "/api/v1/bulk-actions",
        {"action": "compensate", "filters": {}, "reason": "x", "expected_count": 2},
    )
    assert viewer.status_code == 403
    assert BulkJob.objects.count() == 0


def test_two_person_approvals(role_client: Any, settings: Any) -> None:
    settings.SAGAADMIN = {
        **settings.SAGAADMIN,
        "TWO_PERSON_ACTIONS": ["compensate"],
        "TWO_PERSON_BULK_ABOVE": 1,
    }
    failed_sagas(2)
    first, second = role_client("operator"), role_client("operator")
    saga = post(
        first,
        "/api/v1/sagas/bulk-0/actions/compensate",
        {"reason": "refund by hand", "expected_version": 1},
    )
    assert saga.status_code == 202 and saga.json()["status"] == "awaiting_approval"
    action_id = saga.json()["id"]
    own = post(first, f"/api/v1/actions/{action_id}/approve")
    assert own.status_code == 403 and own.json()["errors"][0]["field"] == "approver"
    approved = post(second, f"/api/v1/actions/{action_id}/approve")
    assert approved.status_code == 200 and approved.json()["status"] == "dispatched"
    assert OperatorAction.objects.get(pk=action_id).approved_by != ""

    job = post(
        first,
        "/api/v1/bulk-actions",
        {
            "action": "compensate",
            "filters": {"saga_id": "bulk-1"},
            "reason": "x",
            "expected_count": 1,
        },
    )
    assert job.json()["status"] == "running"  # 1 saga: not above the limit
    big = post(
        first,
        "/api/v1/bulk-actions",
        {"action": "cancel", "filters": {"saga_id": "bulk-"}, "reason": "x", "expected_count": 2},
    )
    assert big.json()["status"] == "awaiting_approval"
    assert (
        post(second, f"/api/v1/bulk-actions/{big.json()['id']}/approve").json()["status"]
        == "running"
    )


def test_attribute_filters_take_json_booleans_and_numbers(role_client: Any) -> None:
    """``{"attr.vip": true}`` matches what ``?attr.vip=true`` matches on the list: the
    reported boolean (or number), not the text."""
    failed_sagas(3)
    # before the saga's other events (a late report): folded first, the saga stays failed
    vip = {"id": "attr-vip", "saga_id": "bulk-0", "type": "saga.started", "saga_type": "order"}
    now = (timezone.now() - timedelta(minutes=1)).isoformat()
    with transaction.atomic():
        events_ingest(
            service=service_get_or_create(name="payment"),
            raws=[
                json.dumps(
                    {**vip, "occurred_at": now, "attributes": {"vip": True, "n": 7}}
                ).encode()
            ],
        )
    operator = role_client("operator")
    for filters, count in (
        ({"attr.vip": True}, 1),
        ({"attr.vip": "true"}, 1),
        ({"attr.vip": False}, 0),
        ({"attr.n": 7}, 1),
        ({"attr.n": "7"}, 1),
        ({"attr.n": 7.5}, 0),
    ):
        preview = post(operator, "/api/v1/bulk-actions/preview", {"filters": filters})
        assert preview.status_code == 200, (filters, preview.json())
        assert preview.json()["count"] == count, filters
    for bad in (None, [1], {"a": 1}):
        refused = post(operator, "/api/v1/bulk-actions/preview", {"filters": {"attr.vip": bad}})
        assert refused.status_code == 400, bad
        assert refused.json()["errors"][0]["field"] == "filters.attr.vip"
