"""Operator actions in a real browser (see conftest.py): the saga page's dialog, the audit page.

The server process defines the test saga types (``ORCHESTRATOR_SAGAS``); a worker on a
thread of this process runs them on the same database. Its telemetry reaches the server
over the ingest API (the reporter a service running the orchestrator on its own uses), so
the server pushes the change to the open page: the test waits for it without reloading.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone
from playwright.sync_api import expect

from orchestrator.engine import saga_start
from orchestrator.worker import Worker
from tests.e2e.conftest import Server, login, screenshot, user_create
from tests.orchestrator import sagas
from tracking.keys import service_key_create
from tracking.models import AuditEntry

pytestmark = [
    pytest.mark.live,
    pytest.mark.postgres,
    pytest.mark.usefixtures("server_defines_test_sagas", "test_sagas"),
]

REPORT_TO: dict[str, Any] = {}


def http_report(*, service: str, events: list[dict[str, Any]]) -> None:
    """The orchestrator's reporter for this test: the server's ingest API."""
    server: Server = REPORT_TO["server"]
    server.post_events(REPORT_TO["secrets"][service], events)


def drain_reporting_to(server: Server, settings: Any) -> int:
    """``Worker().drain()`` on another thread (Playwright runs an event loop on this one,
    and Django refuses ORM calls there), its telemetry going to the server's API."""

    def work() -> int:
        try:
            return Worker().drain()
        finally:
            connections.close_all()

    REPORT_TO["server"] = server
    settings.ORCHESTRATOR = {**settings.ORCHESTRATOR, "REPORTER": f"{__name__}.http_report"}
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result(timeout=60)


def test_an_operator_retries_a_failed_step_and_sees_the_saga_complete(
    page_for: Any, e2e: Server, settings: Any
) -> None:
    # given an orchestrated saga whose charge failed: it waits a minute for its retry
    sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="order-3001", data={"order_id": 3001})
    Worker().drain()
    REPORT_TO["secrets"] = {"order": service_key_create(service_name="order").secret}
    earlier = [  # what the audit log holds already (other sagas, hours ago)
        ("vera", "viewer", "cancel", "order-2990", "forbidden", "your role may not cancel"),
        ("otto", "operator", "skip_step", "order-2991", "conflict", "the saga changed since"),
        ("ada", "admin", "terminate", "order-2992", "done", ""),
    ]
    for hours, (actor, role, action, saga_id, outcome, detail) in enumerate(earlier, 1):
        AuditEntry.objects.create(
            at=timezone.now() - timedelta(hours=4 - hours),
            actor=actor,
            role=role,
            action=action,
            saga_id=saga_id,
            outcome=outcome,
            detail=detail,
            reason="customer asked to stop the order" if action != "skip_step" else "OPS-17",
            state_before={"status": "running", "version": 4},
            state_after={"status": "cancelled" if outcome == "done" else "running", "version": 5},
        )
    user_create("operator", "otto")
    user_create("viewer", "vera")
    page = page_for()
    login(page, "otto", "/sagas/order-3001")
    expect(page.locator("#live-status")).to_have_text("● live")
    panel = page.locator("section.actions-panel")
    expect(page.locator("section.run-panel dl.facts .status")).to_have_text("running")
    # the buttons say what is allowed, and why not the rest
    restart = panel.get_by_role("button", name="Restart as a new saga")
    expect(restart).to_be_disabled()
    restart.focus()
    expect(panel.locator("#why-restart")).to_be_visible()
    expect(panel.locator("#why-restart")).to_have_text("only a finished saga is restarted")

    # when they click "Retry step", give a reason and confirm
    panel.get_by_role("button", name="Retry step").click()
    dialog = page.get_by_role("dialog", name="Retry step")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Step")).to_have_value("charge_payment")
    dialog.get_by_label("Reason").fill("the card provider is back (OPS-42)")
    screenshot(page, "dashboard-actions-dialog")
    dialog.get_by_role("button", name="Confirm").click()

    # then they are back on the saga's page: the retry is done by the orchestrator
    page.wait_for_url(re.compile(r"/sagas/order-3001$"))
    expect(page.locator(".messages")).to_contain_text(
        "Retry step on order-3001: done by the orchestrator."
    )
    history = page.locator("table.operator-actions tbody tr")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("retry_step")
    expect(history.first).to_contain_text("otto")
    expect(history.first).to_contain_text("the card provider is back (OPS-42)")
    expect(history.first.locator(".astatus")).to_have_text("done")
    expect(page.locator("ol.audit-marks li")).to_have_count(1)
    expect(page.locator("#live-status")).to_have_text("● live")

    # when a worker runs the retry now (not in a minute)
    marker = page.evaluate("() => { window.notReloaded = true; return true; }")
    assert marker
    assert drain_reporting_to(e2e, settings) > 0

    # then the open page shows the saga completed, without a reload
    expect(page.locator("section.run-panel dl.facts .status")).to_have_text(
        "completed", timeout=10_000
    )
    expect(page.locator(".facts .status").first).to_have_text("completed")
    assert page.evaluate("window.notReloaded") is True
    expect(panel.get_by_role("button", name="Retry step")).to_be_disabled()
    expect(panel.get_by_role("button", name="Restart as a new saga")).to_be_enabled()
    # (in one step: a live refresh may replace the panel while Playwright waits for it)
    page.evaluate("document.querySelector('section.actions-panel').scrollIntoView()")
    screenshot(page, "dashboard-actions")

    # and the audit page lists the retry, filtered by the saga from its link
    page.get_by_role("link", name="The audit log of this saga").click()
    page.wait_for_url(re.compile(r"/audit/\?saga_id=order-3001$"))
    expect(page.locator('nav a[aria-current="page"]')).to_have_text("Audit")
    rows = page.locator("table.audit tbody tr[data-entry-id]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("otto")
    expect(rows.first.locator(".outcome")).to_have_text("done")

    # and a viewer sees the buttons, none of them enabled
    viewer = page_for()
    login(viewer, "vera", "/sagas/order-3001")
    buttons = viewer.locator("section.actions-panel button[data-action]")
    expect(buttons).to_have_count(10)
    for n in range(10):
        expect(buttons.nth(n)).to_be_disabled()
    expect(viewer.locator("dialog")).to_have_count(0)
    viewer.get_by_role("button", name="Retry step").hover()
    expect(viewer.locator("#why-retry_step")).to_have_text("your role may not retry step")

    # the audit page: every entry, newest first, the refusals too
    viewer.goto("/audit/")
    entries = viewer.locator("table.audit tbody tr[data-entry-id]")
    expect(entries).to_have_count(4)
    expect(entries.first).to_contain_text("order-3001")
    expect(entries.nth(3).locator(".outcome")).to_have_text("forbidden")
    expect(viewer.get_by_role("link", name="CSV")).to_have_attribute("href", "?format=csv")
    screenshot(viewer, "dashboard-audit")
