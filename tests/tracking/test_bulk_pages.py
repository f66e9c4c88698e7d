"""Bulk actions and two-person approvals on the dashboard (tracking/views.py).

The sagas are external ones that failed (ingested like tests/tracking/test_bulk_actions.py
does), so an action is a command through the outbox; the worker's ``bulk_work`` runs here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from outbox.models import OutboxMessage
from tests.tracking.test_bulk_actions import failed_sagas
from tracking import views
from tracking.bulk_actions import bulk_work
from tracking.models import AuditEntry, BulkItem, BulkJob, OperatorAction, Saga

pytestmark = pytest.mark.django_db

RoleClient = Callable[[str | None], Client]
FILTER = {"status": "failed", "saga_id": "bulk-"}


@pytest.fixture(autouse=True)
def _rate_zero(settings: Any) -> None:
    """Jobs started from a page run at the configured rate: none here, no sleeping."""
    settings.SAGAADMIN = {**settings.SAGAADMIN, "BULK_RATE_PER_SECOND": 0.0}


def preview(client: Client, **params: str) -> Any:
    return client.get("/bulk/preview", {"action": "compensate", "reason": "outage", **params})


def confirm(client: Client, expected_count: int, **fields: str) -> Any:
    form = {"action": "compensate", "reason": "payment provider outage", **FILTER, **fields}
    return client.post("/bulk/start", {**form, "expected_count": expected_count})


def count_shown(html: str) -> int:
    found = re.search(r'id="match-count" data-count="(\d+)"', html)
    assert found, "no count on the page"
    return int(found.group(1))


def started_job(client: Client, n: int) -> BulkJob:
    response = confirm(client, n, **FILTER)
    assert response.status_code == 302, response.content.decode()[:2000]
    job = BulkJob.objects.get()
    assert response["Location"] == f"/bulk/{job.pk}/"
    return job


def fragment(client: Client, job: BulkJob, seen: str) -> Any:
    return client.get(
        f"/bulk/{job.pk}/",
        {"seen": seen},
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="bulk-progress",
    )


# -- the form on the saga list ----------------------------------------------------


def test_the_list_offers_operators_their_actions_and_carries_the_filter(
    role_client: RoleClient,
) -> None:
    failed_sagas(2)

    operator = role_client("operator").get("/sagas/", {**FILTER, "sort": "-started_at"})
    admin = role_client("admin").get("/sagas/").content.decode()
    viewer = role_client("viewer").get("/sagas/", FILTER).content.decode()

    html = operator.content.decode()
    assert 'id="bulk-form"' in html and 'action="/bulk/preview"' in html
    options = re.findall(r'<option value="([a-z_]+)">', html.split('id="bulk-form"')[1])
    assert "compensate" in options and "terminate" not in options  # terminate: admins only
    assert 'value="terminate">Terminate</option>' in admin
    # the filter the list shows travels with the form (not the sort or the cursor)
    hidden = re.findall(r'type="hidden" form="bulk-form" name="(\w+)" value="([^"]*)"', html)
    assert sorted(hidden) == [("saga_id", "bulk-"), ("status", "failed")]
    assert 'href="/bulk/"' in html
    assert 'id="bulk-form"' not in viewer and 'form="bulk-form"' not in viewer


def test_the_filter_swap_carries_the_new_filter_to_the_form(role_client: RoleClient) -> None:
    response = role_client("operator").get(
        "/sagas/",
        {"status": "running", "attr": "order_id=42"},
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="saga-table",
    )
    html = response.content.decode()
    assert "<html" not in html  # the table fragment only
    assert 'form="bulk-form" name="status" value="running"' in html
    assert 'form="bulk-form" name="attr" value="order_id=42"' in html


# -- preview and confirm -----------------------------------------------------------


def test_the_preview_counts_what_the_filter_matches_and_shows_a_sample(
    role_client: RoleClient,
) -> None:
    failed_sagas(12)
    failed_sagas(3, prefix="other")  # failed too, but not this filter's

    response = preview(role_client("operator"), **FILTER)

    assert response.status_code == 200
    html = response.content.decode()
    assert count_shown(html) == 12
    sample = re.findall(r'<a class="mono" href="/sagas/(bulk-\d+)">', html)
    assert len(sample) == 10 and len(set(sample)) == 10
    assert "and 2 more." in html
    assert "Confirm 12 sagas" in html
    assert 'name="expected_count" value="12"' in html
    assert '<input type="hidden" name="saga_id" value="bulk-">' in html
    assert '<option value="compensate" selected>' in html
    assert "<code>saga_id=bulk-</code>, <code>status=failed</code>" in html
    assert BulkJob.objects.count() == 0  # a preview starts nothing


def test_confirm_starts_the_job_and_shows_its_page(role_client: RoleClient) -> None:
    failed_sagas(4)
    client = role_client("operator")

    job = started_job(client, 4)

    assert (job.action, job.status, job.total, job.rate) == ("compensate", "running", 4, 0.0)
    assert job.filters == FILTER and job.reason == "payment provider outage"
    assert job.actor.startswith("user-operator-")
    page = client.get(f"/bulk/{job.pk}/").content.decode()
    assert f"Compensate on 4 sagas started (bulk job {job.pk})." in page
    assert 'aria-valuenow="0"' in page and "0 of 4" in page
    assert 'hx-trigger="every 1s"' in page
    assert len(re.findall(r'<tr data-saga="bulk-\d+" data-status="pending">', page)) == 4


def test_a_count_that_changed_since_the_preview_is_refused_with_the_new_one(
    role_client: RoleClient,
) -> None:
    failed_sagas(3)
    client = role_client("operator")
    assert count_shown(preview(client, **FILTER).content.decode()) == 3
    failed_sagas(4)  # one more failed meanwhile (bulk-3)

    response = confirm(client, 3)

    assert response.status_code == 409
    html = response.content.decode()
    assert "the filter matches 4 sagas now, not 3: preview again" in html
    assert 'id="err-expected_count"' in html
    assert count_shown(html) == 4 and "Confirm 4 sagas" in html
    assert 'name="expected_count" value="4"' in html
    assert "payment provider outage</textarea>" in html  # what was typed is kept
    assert BulkJob.objects.count() == 0
    assert confirm(client, 4).status_code == 302  # confirming the new count runs it


@pytest.mark.parametrize(
    ("fields", "status", "field", "message"),
    [
        ({"reason": "  "}, 400, "reason", "say why"),
        ({"action": "terminate"}, 403, "action", "your role may not terminate"),
        ({"action": "explode"}, 404, "action", "no action &#x27;explode&#x27;"),
        ({"status": "bogus"}, 400, "filters", "status: unknown status"),
    ],
)
def test_a_refusal_shows_at_its_field_with_its_status(
    role_client: RoleClient, fields: dict[str, str], status: int, field: str, message: str
) -> None:
    failed_sagas(2)

    response = confirm(role_client("operator"), 2, **fields)

    assert response.status_code == status
    html = response.content.decode()
    found = re.search(rf'id="err-{field}">(.*?)</p>', html, re.S)
    assert found and message in found.group(1), html[:3000]
    assert BulkJob.objects.count() == 0


def test_too_many_sagas_offer_no_confirm_and_are_refused(
    role_client: RoleClient, settings: Any
) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, "BULK_MAX_SAGAS": 2}
    failed_sagas(3)
    client = role_client("operator")

    html = preview(client, **FILTER).content.decode()
    response = confirm(client, 3)

    assert count_shown(html) == 3 and "over 2 sagas" in html
    assert 'id="bulk-confirm"' not in html
    assert response.status_code == 400
    assert "matches over 2 sagas: narrow the filter" in response.content.decode()
    assert BulkJob.objects.count() == 0


def test_the_preview_asks_for_an_action_and_refuses_one_the_role_may_not(
    role_client: RoleClient,
) -> None:
    failed_sagas(1)
    client = role_client("operator")

    none = preview(client, action="", **FILTER)
    forbidden = preview(client, action="terminate", **FILTER)

    assert none.status_code == 400 and 'id="err-action">choose an action<' in none.text
    assert forbidden.status_code == 403
    assert "your role may not terminate" in forbidden.text
    assert count_shown(none.text) == 1  # the count shows all the same


def test_a_viewer_gets_no_form_and_a_post_is_forbidden(role_client: RoleClient) -> None:
    failed_sagas(2)
    viewer = role_client("viewer")

    assert preview(viewer, **FILTER).status_code == 403
    assert confirm(viewer, 2).status_code == 403
    assert BulkJob.objects.count() == 0


# -- the job's page ----------------------------------------------------------------


def test_the_job_page_shows_progress_and_polls_only_its_fragment(role_client: RoleClient) -> None:
    failed_sagas(5)
    client = role_client("operator")
    job = started_job(client, 5)

    assert bulk_work(limit=2) == 2
    page = client.get(f"/bulk/{job.pk}/").content.decode()
    polled = fragment(client, job, "running")

    assert 'aria-valuenow="2"' in page and "40 %" in page and "2 of 5" in page
    assert 'style="width: 40.0%"' in page  # the succeeded part of the bar
    assert len(re.findall(r'data-status="done"', page)) == 2
    assert "dispatched: command" in page
    assert polled.status_code == 200 and "HX-Refresh" not in polled
    body = polled.content.decode()
    assert body.lstrip().startswith('<section id="bulk-progress"')
    assert "<html" not in body and "bulk-items" not in body
    assert 'aria-valuenow="2"' in body and 'hx-trigger="every 1s"' in body

    # when the worker finishes it, the poll answers with the whole page's reload
    assert bulk_work() == 3
    done = fragment(client, job, "running")
    assert done["HX-Refresh"] == "true"
    assert 'data-status="done"' in done.content.decode()
    assert "hx-trigger" not in done.content.decode()  # it stops polling
    final = client.get(f"/bulk/{job.pk}/").content.decode()
    assert "100 %" in final and "5 succeeded" in final and "0 failed" in final
    assert "hx-trigger" not in final and "Cancel the job" not in final
    assert OutboxMessage.objects.filter(type="payment.compensate").count() == 5


def test_per_saga_failures_show_their_message_and_filter(role_client: RoleClient) -> None:
    failed_sagas(3)
    client = role_client("operator")
    confirm(client, 3, action="cancel")  # a failed saga cannot be cancelled
    job = BulkJob.objects.get()
    bulk_work()

    page = client.get(f"/bulk/{job.pk}/", {"items": "failed"}).content.decode()

    assert "3 failed" in page and 'aria-current="true">failed 3<' in page
    assert page.count("status: cannot cancel a saga that is failed") == 3
    assert client.get(f"/bulk/{job.pk}/", {"items": "done"}).text.count("<tr data-saga") == 0


def test_the_results_are_capped_with_a_note(
    role_client: RoleClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "BULK_ITEMS_SHOWN", 2)
    failed_sagas(3)
    client = role_client("operator")
    job = started_job(client, 3)

    page = client.get(f"/bulk/{job.pk}/").content.decode()

    assert page.count("<tr data-saga") == 2
    assert "The first 2 of 3 are shown" in page


def test_an_operator_cancels_a_running_job(role_client: RoleClient) -> None:
    failed_sagas(4)
    client = role_client("operator")
    job = started_job(client, 4)
    bulk_work(limit=1)

    response = client.post(f"/bulk/{job.pk}/cancel", follow=True)

    assert response.status_code == 200
    html = response.content.decode()
    assert f"Bulk job {job.pk} cancelled: 1 of 4 sagas were processed" in html
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert BulkItem.objects.filter(job=job, status="cancelled").count() == 3
    assert "3 cancelled" in html and "Cancel the job" not in html
    assert bulk_work() == 0
    again = client.post(f"/bulk/{job.pk}/cancel", follow=True).content.decode()
    assert "was not cancelled: the job is cancelled already." in again
    assert role_client("viewer").post(f"/bulk/{job.pk}/cancel").status_code == 403


def test_a_big_job_waits_for_a_second_operator(role_client: RoleClient, settings: Any) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, "TWO_PERSON_BULK_ABOVE": 2}
    failed_sagas(3)
    requester, second = role_client("operator"), role_client("operator")
    assert "a second operator approves the job" in preview(requester, **FILTER).text
    job = started_job(requester, 3)
    assert job.status == "awaiting_approval"

    mine = requester.get(f"/bulk/{job.pk}/").content.decode()
    theirs = second.get(f"/bulk/{job.pk}/").content.decode()
    viewer = role_client("viewer").get(f"/bulk/{job.pk}/").content.decode()

    assert "Waiting for a second operator" in mine
    assert f'action="/bulk/{job.pk}/approve"' not in mine
    assert f'action="/bulk/{job.pk}/cancel"' in mine  # the requester may still cancel
    assert f'action="/bulk/{job.pk}/approve"' in theirs and "Approve: run it on 3 sagas" in theirs
    assert f'action="/bulk/{job.pk}/approve"' not in viewer
    assert f'action="/bulk/{job.pk}/cancel"' not in viewer
    assert 'hx-trigger="every 1s"' in mine  # the requester's page sees the approval come
    assert bulk_work() == 0

    refused = requester.post(f"/bulk/{job.pk}/approve", follow=True).content.decode()
    assert "was not approved: a second person must approve, not the requester." in refused
    assert fragment(requester, job, "awaiting_approval").get("HX-Refresh") is None

    approved = second.post(f"/bulk/{job.pk}/approve", follow=True).content.decode()
    job.refresh_from_db()
    assert job.status == "running" and job.approved_by.startswith("user-operator-")
    assert f"Bulk job {job.pk} approved" in approved
    assert fragment(requester, job, "awaiting_approval")["HX-Refresh"] == "true"
    assert bulk_work() == 3
    job.refresh_from_db()
    assert (job.status, job.succeeded) == ("done", 3)


def test_the_jobs_list_is_newest_first_and_linked_from_the_audit_page(
    role_client: RoleClient,
) -> None:
    failed_sagas(2)
    client = role_client("operator")
    first = started_job(client, 2)
    client.post(f"/bulk/{first.pk}/cancel")
    confirm(client, 2, action="cancel")
    second = BulkJob.objects.exclude(pk=first.pk).get()

    html = role_client("viewer").get("/bulk/").content.decode()

    ids = re.findall(r'<tr data-job-id="(\d+)" data-status="(\w+)">', html)
    assert ids == [(str(second.pk), "running"), (str(first.pk), "cancelled")]
    assert 'href="/bulk/"' in role_client("viewer").get("/audit/").content.decode()


def test_a_missing_job_is_404(role_client: RoleClient) -> None:
    client = role_client("operator")
    assert client.get("/bulk/999/").status_code == 404
    assert client.post("/bulk/999/cancel").status_code == 404
    assert client.post("/bulk/999/approve").status_code == 404


# -- single actions waiting for a second operator -------------------------------------


def waiting_action(client: Client, saga_id: str) -> OperatorAction:
    saga = Saga.objects.get(saga_id=saga_id)
    response = client.post(
        f"/actions/compensate/{saga_id}",
        {"reason": "the provider refunds", "expected_version": saga.version},
    )
    assert response.status_code == 302
    record = OperatorAction.objects.get(saga_id=saga_id)
    assert record.status == "awaiting_approval"
    return record


def approval_buttons(html: str, record: OperatorAction) -> set[str]:
    return set(re.findall(rf'data-(approve|reject)="{record.pk}"', html))


def test_a_waiting_action_is_approved_by_a_second_operator(
    role_client: RoleClient, settings: Any
) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, "TWO_PERSON_ACTIONS": ["compensate"]}
    failed_sagas(1)
    requester, second = role_client("operator"), role_client("operator")
    record = waiting_action(requester, "bulk-0")

    mine = requester.get("/sagas/bulk-0").content.decode()
    theirs = second.get("/sagas/bulk-0").content.decode()
    viewer = role_client("viewer").get("/sagas/bulk-0").content.decode()

    assert approval_buttons(mine, record) == set()
    assert "waiting for a second operator (you asked)" in mine
    assert approval_buttons(theirs, record) == {"approve", "reject"}
    assert approval_buttons(viewer, record) == set()
    assert OutboxMessage.objects.filter(type="payment.compensate").count() == 0

    refused = requester.post(f"/operator-actions/{record.pk}/approve", follow=True)
    assert "was not approved: a second person must approve, not the requester." in refused.text
    response = second.post(f"/operator-actions/{record.pk}/approve")

    assert response.status_code == 302 and response["Location"] == "/sagas/bulk-0"
    record.refresh_from_db()
    assert record.status == "dispatched" and record.approved_by.startswith("user-operator-")
    assert OutboxMessage.objects.filter(type="payment.compensate").count() == 1
    page = second.get("/sagas/bulk-0").content.decode()
    assert f"Compensate on bulk-0 approved (by {record.actor}): dispatched." in page
    assert approval_buttons(page, record) == set() and "approved by user-operator-" in page
    assert AuditEntry.objects.filter(outcome="approved").count() == 1
    again = second.post(f"/operator-actions/{record.pk}/reject", follow=True).text
    assert "was not rejected: the action is dispatched, not awaiting approval." in again


def test_a_waiting_action_is_rejected_with_a_note(role_client: RoleClient, settings: Any) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, "TWO_PERSON_ACTIONS": ["compensate"]}
    failed_sagas(1)
    record = waiting_action(role_client("operator"), "bulk-0")
    second = role_client("operator")

    response = second.post(
        f"/operator-actions/{record.pk}/reject", {"note": "refunds run tonight"}, follow=True
    )

    record.refresh_from_db()
    assert record.status == "rejected"
    assert "Compensate on bulk-0 rejected" in response.text
    assert OutboxMessage.objects.filter(type="payment.compensate").count() == 0
    entry = AuditEntry.objects.filter(outcome="rejected").get()
    assert entry.detail == "refunds run tonight"
    assert role_client("viewer").post(f"/operator-actions/{record.pk}/approve").status_code == 403
    assert second.post("/operator-actions/9999/approve").status_code == 404


def test_the_time_a_job_takes_reads_as_words() -> None:
    from tracking.views import _eta_text

    assert _eta_text(0.2) == "under a second"  # was "about 0 s"
    assert _eta_text(12.4) == "about 12 s"
    assert _eta_text(600) == "about 600 s (10 min)"
