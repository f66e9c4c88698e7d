"""The Orchestrator page and an orchestrated saga's page in a real browser (see conftest.py).

The server process defines the test saga types too (``ORCHESTRATOR_SAGAS``), so an
admin can start one there; a worker in this process runs it on the same database.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.utils import timezone
from playwright.sync_api import expect

from orchestrator import circuit
from orchestrator.engine import saga_start
from orchestrator.worker import Worker
from tests.e2e.conftest import PHONE, login, screenshot, user_create
from tests.orchestrator import sagas

pytestmark = [
    pytest.mark.live,
    pytest.mark.postgres,
    pytest.mark.usefixtures("server_defines_test_sagas", "test_sagas"),
]


def drain() -> int:
    """``Worker().drain()`` off this thread: Playwright runs an event loop here, and Django
    refuses ORM calls from a thread with a running loop."""

    def work() -> int:
        try:
            return Worker().drain()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result(timeout=60)


def test_an_admin_starts_a_saga_and_sees_it_run(page_for, e2e) -> None:
    # given runs that wait (a reply, a retry's backoff), an open circuit, and an admin
    saga_start(saga_type="test-remote", saga_id="order-1001", data={"order_id": 1001})
    sagas.SCRIPT["forward:create_order"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="order-1002", data={"order_id": 1002})
    Worker().drain()
    with transaction.atomic():
        for _ in range(5):
            circuit.record("shipping", ok=False, now=timezone.now() - timedelta(seconds=3))
    user_create("admin", "ada")
    page = page_for()
    login(page, "ada", "/orchestrator/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Orchestrator")
    expect(page.locator('nav a[aria-current="page"]')).to_have_text("Orchestrator")
    runs = page.locator("table.runs tbody tr[data-saga-id]")
    expect(runs).to_have_count(2)
    expect(page.locator('tr[data-saga-id="order-1001"]')).to_contain_text(
        "waiting for payment to answer charge"
    )
    expect(page.locator('tr[data-saga-id="order-1002"]')).to_contain_text("retry 2 of create_order")
    expect(page.locator('tr[data-service="shipping"] .circuit')).to_have_text("open")
    expect(page.locator("#definition-test-order tbody tr")).to_have_count(4)

    # when they start a saga with data that is not JSON
    page.get_by_label("Saga type").select_option("test-order")
    page.get_by_label("Saga id").fill("order-2001")
    page.get_by_label("Data").fill('{"order_id": 2001,}')
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Start saga").click()
    # then nothing starts; the error is at the data field, with what they typed
    assert posted.value.status == 400
    expect(page.locator("#start-data-error")).to_contain_text("not valid JSON")
    expect(page.get_by_label("Data")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Data")).to_have_value('{"order_id": 2001,}')
    expect(page.get_by_label("Saga id")).to_have_value("order-2001")
    expect(page.get_by_label("Saga type")).to_have_value("test-order")

    # when they correct it and start again
    page.get_by_label("Data").fill('{"order_id": 2001, "amount": 25.0}')
    page.get_by_role("button", name="Start saga").click()
    # then they are on the saga's page: orchestrated, the run waiting for a worker
    page.wait_for_url(re.compile(r"/sagas/order-2001$"))
    expect(page.locator(".messages")).to_contain_text("Started test-order saga order-2001.")
    expect(page.locator("a.orchestrated")).to_have_text("orchestrated")
    panel = page.locator("section.run-panel")
    expect(panel.get_by_role("heading", level=2)).to_have_text("Orchestrator run")
    expect(panel.locator("dl.facts")).to_contain_text("running")
    expect(panel.locator("tbody .status-pending")).to_have_count(4)

    # when a worker runs it
    assert drain() > 0
    page.reload()
    # then every step succeeded once, and the run is finished
    expect(panel.locator("dl.facts .status")).to_have_text("completed")
    expect(panel.locator("tbody .status-succeeded")).to_have_count(4)
    for step in sagas.ORDER_STEPS:
        expect(panel.locator(f'tr[data-step="{step}"] td').nth(4)).to_have_text("1")
    expect(page.locator(".facts .status").first).to_have_text("completed")  # the telemetry
    expect(page.locator(".attrs")).to_contain_text("order_id")
    page.evaluate("document.querySelector('section.run-panel').scrollIntoView()")  # one step
    screenshot(page, "dashboard-saga-orchestrated")

    # and the Orchestrator page no longer lists it among the runs not finished
    page.goto("/orchestrator/")
    expect(runs).to_have_count(2)
    expect(page.locator('tr[data-saga-id="order-2001"]')).to_have_count(0)
    screenshot(page, "dashboard-orchestrator")

    # and on a phone the page fits the width (wide tables scroll in their own box)
    phone = page_for(PHONE)
    login(phone, "ada", "/orchestrator/")
    expect(phone.get_by_role("button", name="Start saga")).to_be_visible()
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"/orchestrator/ is {width} px wide on a phone"
    screenshot(phone, "orchestrator-390")
