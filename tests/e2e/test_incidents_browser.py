"""Incidents and saga types in a real browser (uvicorn + Chromium, see conftest.py).

Incidents come from events posted to the server and one detector pass run here,
on the same committed database; no waiting: a deadline in the past, a
non-retryable failure and a failed compensation fire at once.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from playwright.sync_api import expect

from tests.conftest import role_group
from tests.e2e.conftest import DESKTOP, PHONE, Server, ago, iso, login, screenshot, user_create
from tracking.detector import detect_pass
from tracking.keys import service_key_create
from tracking.models import Incident, SagaType

pytestmark = [pytest.mark.live, pytest.mark.postgres]


def _incidents(e2e: Server) -> dict[str, int]:
    """Three open incidents (stuck, retries_exhausted, compensation_failed); ids by kind."""
    key = service_key_create(service_name="payment").secret
    declined = {"type": "CardDeclined", "message": "insufficient funds", "retryable": False}
    deadline = iso(datetime.now(UTC) - timedelta(seconds=5))
    events = [
        {"id": "s1", "saga_id": "order-2001", "type": "saga.started", "saga_type": "order"}
        | {"occurred_at": ago(28), "deadline": deadline},
        {"id": "s2", "saga_id": "order-2001", "type": "step.started", "step": "reserve"}
        | {"occurred_at": ago(27)},
        {"id": "f1", "saga_id": "order-2002", "type": "saga.started", "saga_type": "order"}
        | {"occurred_at": ago(26)},
        {"id": "f2", "saga_id": "order-2002", "type": "step.started", "step": "charge"}
        | {"occurred_at": ago(25)},
        {"id": "f3", "saga_id": "order-2002", "type": "step.failed", "step": "charge"}
        | {"occurred_at": ago(24), "error": declined},
        {"id": "c1", "saga_id": "ship-3001", "type": "saga.started", "saga_type": "shipping"}
        | {"occurred_at": ago(23)},
        {"id": "c2", "saga_id": "ship-3001", "type": "step.started", "step": "book"}
        | {"occurred_at": ago(22)},
        {"id": "c3", "saga_id": "ship-3001", "type": "step.failed", "step": "book"}
        | {"occurred_at": ago(21)},
        {"id": "c4", "saga_id": "ship-3001", "type": "compensation.started", "step": "book"}
        | {"occurred_at": ago(20)},
        {"id": "c5", "saga_id": "ship-3001", "type": "compensation.failed", "step": "book"}
        | {"occurred_at": ago(19), "error": {"type": "CarrierDown", "retryable": True}},
    ]
    e2e.post_events(key, events)
    assert detect_pass().opened == 3
    return dict(Incident.objects.values_list("kind", "pk"))


def _admin_create(username: str) -> None:
    """An admin who may edit thresholds.

    After a flush ``role_group`` re-creates the admin group with migration 0004's
    permissions only; migration 0010 added ``edit_thresholds`` to it.
    """
    user_create("admin", username)
    edit = Permission.objects.get(content_type__app_label="tracking", codename="edit_thresholds")
    role_group("admin").permissions.add(edit)


def _rows(page: Any) -> Any:
    return page.locator("table.incidents tbody tr[data-incident-id]")


def test_an_operator_resolves_an_incident_and_it_leaves_the_list(page_for, e2e) -> None:
    # given three open incidents and an operator on the incidents page
    ids = _incidents(e2e)
    user_create("operator", "olga")
    page = page_for()
    login(page, "olga", "/incidents/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Incidents")
    expect(_rows(page)).to_have_count(3)
    expect(page.locator("#nav-incidents")).to_contain_text("3")
    # when they acknowledge the stuck one with a note
    stuck = page.locator(f"#incident-{ids['stuck']}")
    stuck.get_by_label(re.compile(r"^Note")).fill("checking the warehouse API")
    stuck.get_by_role("button", name="Acknowledge").click()
    # then the page says so and the row shows who is on it
    expect(page.locator(".messages")).to_contain_text(f"Incident {ids['stuck']}")
    expect(stuck.locator(".istatus")).to_have_text("acknowledged")
    expect(stuck.locator(".ack")).to_contain_text("acknowledged by olga")
    expect(stuck.get_by_role("button", name="Acknowledge")).to_have_count(0)
    # when they resolve the failed charge with a note
    failed = page.locator(f"#incident-{ids['retries_exhausted']}")
    expect(failed.locator(".reason")).to_contain_text("non-retryable")
    failed.get_by_label("Resolution note").fill("refunded the customer by hand")
    failed.get_by_role("button", name="Resolve").click()
    # then it is gone from the unresolved list, and the count went down
    expect(page.locator(".messages")).to_contain_text(
        f"Incident {ids['retries_exhausted']} (retries_exhausted on order-2002) resolved."
    )
    expect(_rows(page)).to_have_count(2)
    expect(failed).to_have_count(0)
    expect(page.locator("#nav-incidents")).to_contain_text("2")
    expect(page).to_have_url(re.compile(r"/incidents/$"))
    screenshot(page, "dashboard-incidents")
    # and the resolved list has it, with the note
    page.get_by_label("State").select_option("resolved")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"state=resolved"))
    expect(_rows(page)).to_have_count(1)
    expect(_rows(page).first.locator(".res")).to_contain_text("refunded the customer by hand")
    # and the saga's page shows no open incident any more, but lists the resolved one
    _rows(page).first.get_by_role("link", name="order-2002").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("order-2002")
    expect(page.locator(".facts .incident")).to_have_count(0)
    expect(_rows(page)).to_have_count(1)


def _learned_sagas(e2e: Server) -> None:
    """110 finished order sagas (enough to learn from), 3 shipping sagas (not yet)."""
    key = service_key_create(service_name="payment").secret
    events: list[dict[str, Any]] = []
    for n in range(110):
        sid = f"order-{n}"
        start = 900 - n * 5
        charge = 0.4 + (n % 10) * 0.25  # 0.4 s to 2.65 s
        outcome = "failed" if n % 10 == 9 else "succeeded"
        events += [
            {"id": f"{sid}-1", "saga_id": sid, "type": "saga.started", "saga_type": "order"}
            | {"occurred_at": ago(start)},
            {"id": f"{sid}-2", "saga_id": sid, "type": "step.started", "step": "reserve"}
            | {"occurred_at": ago(start - 0.1)},
            {"id": f"{sid}-3", "saga_id": sid, "type": "step.succeeded", "step": "reserve"}
            | {"occurred_at": ago(start - 0.3)},
            {"id": f"{sid}-4", "saga_id": sid, "type": "step.started", "step": "charge"}
            | {"occurred_at": ago(start - 0.4)},
            {"id": f"{sid}-5", "saga_id": sid, "type": f"step.{outcome}", "step": "charge"}
            | {"occurred_at": ago(start - 0.4 - charge)},
        ]
    for n in range(3):
        sid = f"ship-{n}"
        events += [
            {"id": f"{sid}-1", "saga_id": sid, "type": "saga.started", "saga_type": "shipping"}
            | {"occurred_at": ago(300 - n)},
            {"id": f"{sid}-2", "saga_id": sid, "type": "step.started", "step": "book"}
            | {"occurred_at": ago(299 - n)},
            {"id": f"{sid}-3", "saga_id": sid, "type": "step.succeeded", "step": "book"}
            | {"occurred_at": ago(297 - n)},
        ]
    e2e.post_events(key, events)
    # The server creates these after its commit, unless this process-long server
    # created them for an earlier test (whose rows the flush removed).
    for name in ("order", "shipping"):
        SagaType.objects.get_or_create(name=name)


def test_an_admin_sets_a_step_threshold_and_sees_a_bad_one_named(page_for, e2e) -> None:
    # given learned step durations and an admin on the saga types page
    _learned_sagas(e2e)
    order = SagaType.objects.get(name="order").pk
    _admin_create("ada")
    page = page_for()
    login(page, "ada", "/saga-types/")
    card = page.locator(f"#type-{order}")
    expect(card.get_by_role("heading", level=2)).to_have_text("order")
    charge = card.locator("table.steps tr").filter(has_text="charge")
    expect(charge.locator("td").nth(1)).to_have_text("110")
    expect(charge.locator("td").nth(2)).to_have_text("10 %")
    expect(charge.locator("td").last).to_contain_text("(learned)")
    shipping = page.locator("section.type-card").filter(has_text="shipping")
    expect(shipping.locator("table.steps")).to_contain_text("learning (3 of 100 samples)")
    # when they open the form and type a step threshold that is not a number
    card.get_by_text("Edit thresholds of order").click()
    card.get_by_label("Step thresholds").fill("charge=soon")
    card.get_by_role("button", name="Save order").click()
    # then the form stays open with the error at that field
    card = page.locator(f"#type-{order}")
    error = card.locator(f"#t{order}-step_thresholds-error")
    expect(error).to_contain_text("charge: a whole number of seconds")
    expect(card.get_by_label("Step thresholds")).to_have_value("charge=soon")
    # when they correct it and set the stuck threshold too
    card.get_by_label("Step thresholds").fill("charge=45")
    card.get_by_label("Stuck after (seconds)").fill("600")
    card.get_by_role("button", name="Save order").click()
    # then it is saved, and the charge step's bound is the configured one
    expect(page.locator(".messages")).to_contain_text("Saved the thresholds of order.")
    card = page.locator(f"#type-{order}")
    expect(card.locator("dl.facts")).to_contain_text("600 s (10 min)")
    charge = card.locator("table.steps tr").filter(has_text="charge")
    expect(charge.locator("td").last).to_have_text("45 s (configured)")
    card.get_by_text("Edit thresholds of order").click()
    expect(card.get_by_label("Step thresholds")).to_have_value("charge=45")
    screenshot(page, "dashboard-saga-types")


PAGES = {
    "incidents": "/incidents/",
    "saga-types": "/saga-types/",
    "overview": "/",
    "detail-incidents": "/sagas/ship-3001",
    "list-incidents": "/sagas/",
}


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_the_incident_pages_fit_the_width_without_script_errors(page_for, e2e, viewport) -> None:
    # given incidents, and an admin (who sees every form) at this width
    _incidents(e2e)
    SagaType.objects.get_or_create(name="order")
    _admin_create("ada")
    page = page_for(viewport)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console", lambda m: errors.append(f"{m.text} {m.location}") if m.type == "error" else None
    )
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    login(page, "ada", "/")
    width = viewport["width"]
    for name, path in PAGES.items():
        # when they open the page
        page.goto(path)
        page.wait_for_load_state("networkidle")
        screenshot(page, f"{name}-{width}")
        # then it fits the width (wide tables scroll in their own box)
        scroll_width = page.evaluate("document.documentElement.scrollWidth")
        assert scroll_width <= width, f"{path} is {scroll_width} px wide at {width} px"
        # and on a desktop the incident table needs no scrolling of its own
        if width == DESKTOP["width"] and page.locator("table.incidents").count():
            inner = page.evaluate(
                "(() => { const w = document.querySelector('table.incidents').parentElement;"
                " return w.scrollWidth - w.clientWidth; })()"
            )
            assert inner <= 0, f"{path}: the incident table is {inner} px wider than its box"
    # and the badges are where they belong
    page.goto("/sagas/")
    expect(page.locator('tr[data-saga-id="ship-3001"] .incident')).to_contain_text(
        "compensation_failed"
    )
    assert errors == []


def test_a_note_being_typed_survives_a_live_refresh_of_the_detail_page(page_for, e2e) -> None:
    # given an operator typing a resolution note on a saga's page, live updates connected
    ids = _incidents(e2e)
    key = service_key_create(service_name="inventory").secret
    user_create("operator", "olga")
    page = page_for()
    login(page, "olga", "/sagas/ship-3001")
    expect(page.locator("#live-status")).to_have_text("● live")
    events = page.locator("table.events tbody tr")
    expect(events).to_have_count(5)
    note = page.locator(f"#resolve-note-{ids['compensation_failed']}")
    note.fill("carrier booked by phone")
    # when a new event of the saga arrives and the page body is replaced
    e2e.post_events(
        key, [{"id": "c6", "saga_id": "ship-3001", "type": "heartbeat", "occurred_at": ago(0)}]
    )
    expect(events).to_have_count(6, timeout=2000)
    # then the note is still there, and resolving with it works
    expect(note).to_have_value("carrier booked by phone")
    page.locator(f"#incident-{ids['compensation_failed']}").get_by_role(
        "button", name="Resolve"
    ).click()
    expect(page.locator(".messages")).to_contain_text("resolved")
    expect(page.locator(".facts .incident")).to_have_count(0)
    expect(page.locator(".handling .res")).to_contain_text("carrier booked by phone")
