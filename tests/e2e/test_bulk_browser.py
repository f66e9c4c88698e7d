"""A bulk action in a real browser (see conftest.py): filter, preview, confirm, watch it run.

The server starts jobs at rate 0 (``SAGAADMIN_BULK_RATE_PER_SECOND``); nothing in it runs
them. A thread of this process plays the worker: ``bulk_work`` a few sagas at a time, on
its own database connection, while the open job page polls its progress bar.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.db import connections
from playwright.sync_api import expect

from tests.e2e.conftest import Server, environ_set, login, screenshot, user_create
from tests.tracking.test_bulk_actions import failed_sagas
from tracking.bulk_actions import bulk_work
from tracking.models import BulkJob

pytestmark = [pytest.mark.live, pytest.mark.postgres]

SAGAS = 40


@pytest.fixture(scope="module", autouse=True)
def _server_starts_jobs_at_rate_zero() -> Iterator[None]:
    """Set before the module's server starts (autouse fixtures come first in their scope)."""
    yield from environ_set("SAGAADMIN_BULK_RATE_PER_SECOND", "0")


def work_slowly() -> int:
    """The worker: a few sagas at a time, so the page sees the bar move."""
    done = 0
    try:
        deadline = time.monotonic() + 60
        while BulkJob.objects.filter(status="running").exists():
            done += bulk_work(limit=4)
            time.sleep(0.4)
            assert time.monotonic() < deadline, "the job did not finish in 60 s"
        return done
    finally:
        connections.close_all()


def test_an_operator_runs_a_bulk_compensation_and_watches_it_finish(
    page_for: Any, e2e: Server
) -> None:
    # given failed sagas, and others the filter leaves out
    failed_sagas(SAGAS, prefix="order")
    failed_sagas(3, prefix="refund")
    user_create("operator", "otto")
    page = page_for()
    login(page, "otto", "/sagas/")

    # when the operator filters the list: failed, ids starting "order-"
    filters = page.get_by_role("search", name="Filter sagas")
    filters.get_by_label("Status").select_option("failed")
    filters.get_by_label("Saga id").fill("order-")
    filters.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"saga_id=order-"))
    expect(page.locator("#saga-rows tr")).to_have_count(SAGAS)  # the list's first page

    # and asks for a bulk compensation with a reason
    page.get_by_text("Bulk action on every saga this filter matches").click()
    bulk = page.get_by_role("form", name="Bulk action")
    bulk.get_by_label("Action").select_option("compensate")
    bulk.get_by_label("Reason").fill("payment provider outage (OPS-77)")
    screenshot(page, "dashboard-bulk-form")
    bulk.get_by_role("button", name="Preview").click()

    # then the preview counts the sagas the filter matches and shows a sample
    page.wait_for_url(re.compile(r"/bulk/preview\?"))
    expect(page.locator("#match-count")).to_have_text(str(SAGAS))
    expect(page.locator("ul.bulk-sample li")).to_have_count(10)
    expect(page.locator("ul.bulk-sample a").first).to_have_text(re.compile(r"^order-\d+$"))
    expect(page.get_by_label("Reason")).to_have_value("payment provider outage (OPS-77)")
    screenshot(page, "dashboard-bulk-preview")

    # when they confirm
    page.get_by_role("button", name=f"Confirm {SAGAS} sagas").click()
    page.wait_for_url(re.compile(r"/bulk/\d+/$"))
    expect(page.locator(".messages")).to_contain_text(f"Compensate on {SAGAS} sagas started")
    expect(page.locator(".ppercent")).to_have_text("0 %")
    bar = page.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "0")

    # and a worker runs the job: the bar fills without the operator doing anything
    page.evaluate("() => { window.notReloaded = true; }")
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(work_slowly)
        expect(bar).not_to_have_attribute("aria-valuenow", "0", timeout=10_000)
        assert page.evaluate("window.notReloaded") is True  # the fragment only, so far
        expect(page.locator(".ppercent")).to_have_text("100 %", timeout=30_000)
        assert worker.result(timeout=60) == SAGAS

    # then the page shows the job done: every saga's command, nothing left to cancel
    expect(page.locator("#bulk-progress")).to_have_attribute("data-status", "done")
    expect(page.locator(".psucceeded")).to_have_text(f"{SAGAS} succeeded")
    expect(page.locator("table.bulk-items tbody tr[data-status=done]")).to_have_count(SAGAS)
    expect(page.get_by_role("button", name="Cancel the job")).to_have_count(0)
    expect(page.locator("table.bulk-items tbody tr").first).to_contain_text("dispatched")
    page.set_viewport_size({"width": 1280, "height": 900})
    screenshot(page, "dashboard-bulk")  # docs/img/dashboard-bulk.png is a copy

    # and the jobs list has it
    page.goto("/bulk/")
    expect(page.locator("table.bulk-jobs tbody tr")).to_have_count(1)
    expect(page.locator("table.bulk-jobs tbody tr").first).to_contain_text(f"{SAGAS} of {SAGAS}")
