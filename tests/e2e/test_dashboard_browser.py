"""The dashboard in a real browser: login, filters, the waterfall, live updates, escaping.

Each test runs uvicorn and Chromium (see conftest.py) on the PostgreSQL test
database; they skip with a reason elsewhere and fail in CI when either is missing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import DESKTOP, PHONE, Server, ago, login, screenshot, user_create
from tracking.keys import service_key_create

pytestmark = [pytest.mark.live, pytest.mark.postgres]

XSS = "<script>window.__xss = 1</script>"


def _sagas(e2e: Server) -> dict[str, str]:
    """Three sagas over two services; returns the service keys by service name.

    order-1001 completed in the last ten seconds: reserve (inventory), a
    stock.reserved message to payment, charge failed once and succeeded on the retry.
    order-1002 compensated: charge declined, reserve undone; reported three
    minutes late, so its clocks are flagged as skewed.
    order-1003 running: reserve started.
    """
    keys = {name: service_key_create(service_name=name).secret for name in ("payment", "inventory")}
    inventory = [
        {"id": "a1", "saga_id": "order-1001", "type": "saga.started", "saga_type": "order"}
        | {"occurred_at": ago(9.5), "attributes": {"order_id": 1001}},
        {"id": "a2", "saga_id": "order-1001", "type": "step.started", "step": "reserve"}
        | {"occurred_at": ago(8.5)},
        {"id": "a3", "saga_id": "order-1001", "type": "step.succeeded", "step": "reserve"}
        | {"occurred_at": ago(6.5)},
        {"id": "a4", "saga_id": "order-1001", "type": "message.published"}
        | {"occurred_at": ago(6.4), "message": {"name": "stock.reserved", "id": "m-1001"}},
        {"id": "b1", "saga_id": "order-1002", "type": "saga.started", "saga_type": "order"}
        | {"occurred_at": ago(180)},
        {"id": "b2", "saga_id": "order-1002", "type": "step.started", "step": "reserve"}
        | {"occurred_at": ago(179)},
        {"id": "b3", "saga_id": "order-1002", "type": "step.succeeded", "step": "reserve"}
        | {"occurred_at": ago(178)},
        {"id": "b6", "saga_id": "order-1002", "type": "compensation.started", "step": "reserve"}
        | {"occurred_at": ago(175)},
        {"id": "b7", "saga_id": "order-1002", "type": "compensation.succeeded", "step": "reserve"}
        | {"occurred_at": ago(174)},
        {"id": "c1", "saga_id": "order-1003", "type": "saga.started", "saga_type": "order"}
        | {"occurred_at": ago(6)},
        {"id": "c2", "saga_id": "order-1003", "type": "step.started", "step": "reserve"}
        | {"occurred_at": ago(5)},
    ]
    declined = {"type": "CardDeclined", "message": "insufficient funds", "retryable": False}
    payment = [
        {"id": "a5", "saga_id": "order-1001", "type": "message.consumed"}
        | {"occurred_at": ago(6), "message": {"name": "stock.reserved", "id": "m-1001"}},
        {"id": "a6", "saga_id": "order-1001", "type": "step.started", "step": "charge"}
        | {"occurred_at": ago(5.5)},
        {"id": "a7", "saga_id": "order-1001", "type": "step.failed", "step": "charge"}
        | {"occurred_at": ago(3.5), "error": {"type": "Timeout", "retryable": True}},
        {"id": "a8", "saga_id": "order-1001", "type": "step.started", "step": "charge"}
        | {"occurred_at": ago(2.5), "attempt": 2},
        {"id": "a9", "saga_id": "order-1001", "type": "step.succeeded", "step": "charge"}
        | {"occurred_at": ago(1.5), "attempt": 2, "payload": {"amount": 42}},
        {"id": "a10", "saga_id": "order-1001", "type": "saga.completed"} | {"occurred_at": ago(1)},
        {"id": "b4", "saga_id": "order-1002", "type": "step.started", "step": "charge"}
        | {"occurred_at": ago(177)},
        {"id": "b5", "saga_id": "order-1002", "type": "step.failed", "step": "charge"}
        | {"occurred_at": ago(176), "error": declined},
        {"id": "b8", "saga_id": "order-1002", "type": "saga.compensated"}
        | {"occurred_at": ago(173)},
    ]
    e2e.post_events(keys["inventory"], inventory)
    e2e.post_events(keys["payment"], payment)
    return keys


def _rows(page: Any) -> Any:
    return page.locator("#saga-rows tr[data-saga-id]")


def _wait_live(page: Any) -> None:
    """The page's websocket is open (pushes sent before this would be missed)."""
    expect(page.locator("#live-status")).to_have_text("● live")


def test_a_viewer_logs_in_through_the_form_and_sees_name_and_role(page_for, e2e) -> None:
    # given a viewer and a browser with no session
    user_create("viewer", "vera")
    page = page_for()
    # when they open the dashboard
    page.goto("/")
    # then they are sent to the login form, keeping where they wanted to go
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    # when they log in with the right password
    login(page, "vera", "/")
    # then the overview shows, with their name and role in the header
    expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    header = page.locator("header .who")
    expect(header).to_contain_text("vera")
    expect(header.locator(".role")).to_have_text("viewer")


def test_a_wrong_password_keeps_the_user_on_the_login_form(page_for, e2e) -> None:
    # given a viewer
    user_create("viewer", "vera")
    page = page_for()
    page.goto("/login/")
    # when they type the wrong password
    page.get_by_label("User name").fill("vera")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    # then the form says so and nobody is shown as logged in
    expect(page.get_by_role("alert")).to_contain_text("did not match")
    expect(page.locator("header .who")).to_have_count(0)


def test_the_status_filter_goes_into_the_url_and_back_restores_the_list(page_for, e2e) -> None:
    # given three sagas and a viewer on the saga list
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    expect(_rows(page)).to_have_count(3)
    # (only the saga reported minutes late has the clock-skew flag)
    expect(page.locator("#saga-rows .flag")).to_have_count(1)
    expect(page.locator('tr[data-saga-id="order-1002"] .flag')).to_have_text("clock_skew")
    # when they pick the status "compensated"
    page.get_by_label("Status").select_option("compensated")
    # then the URL carries the filter and only the matching saga is listed
    expect(page).to_have_url(re.compile(r"/sagas/\?(.*&)?status=compensated(&|$)"))
    expect(_rows(page)).to_have_count(1)
    expect(_rows(page).first).to_have_attribute("data-saga-id", "order-1002")
    # when they reload, the filter is still applied (it lives in the URL)
    page.reload()
    expect(page.get_by_label("Status")).to_have_value("compensated")
    expect(_rows(page)).to_have_count(1)
    # when they go back
    page.go_back()
    # then the unfiltered list is back
    expect(page).to_have_url(re.compile(r"/sagas/$"))
    expect(_rows(page)).to_have_count(3)
    expect(page.get_by_label("Status")).to_have_value("")


def test_a_second_filter_replaces_the_first_in_the_url(page_for, e2e) -> None:
    # given a viewer whose list is already filtered by status
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/?status=running")
    expect(_rows(page)).to_have_count(1)
    # when they change the status filter
    page.get_by_label("Status").select_option("completed")
    # then the URL names the new status once, and the list shows that status only
    expect(page).to_have_url(re.compile(r"status=completed"))
    assert page.url.count("status=") == 1, page.url
    expect(_rows(page)).to_have_count(1)
    expect(_rows(page).first).to_have_attribute("data-saga-id", "order-1001")


def test_the_detail_page_draws_lanes_bars_arrows_and_the_event_table(page_for, e2e) -> None:
    # given the completed saga with a retried step and a message between services
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    # when the viewer opens it from the list
    page.get_by_role("link", name="order-1001").click()
    # then the head shows its id and status
    expect(page).to_have_url(re.compile(r"/sagas/order-1001$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("order-1001")
    expect(page.locator(".facts .status")).to_have_text("completed")
    # and the waterfall has one lane per step, one bar per attempt
    waterfall = page.locator(".waterfall")
    lanes = waterfall.locator(".lane").filter(has=page.locator(".bar"))
    expect(lanes.locator(".lane-name strong")).to_have_text(["reserve", "charge"])
    expect(lanes.nth(0).locator(".bar")).to_have_count(1)
    charge_bars = lanes.nth(1).locator(".bar")
    expect(charge_bars).to_have_text([re.compile(r"#1 failed"), re.compile(r"#2 succeeded")])
    expect(charge_bars.nth(0)).to_have_class(re.compile(r"\bout-failed\b"))
    expect(charge_bars.nth(1)).to_have_class(re.compile(r"\bout-succeeded\b"))
    # the retry starts after the failed attempt on the shared axis
    first, second = (charge_bars.nth(i).bounding_box() for i in (0, 1))
    assert first is not None and second is not None
    assert second["x"] >= first["x"] + first["width"] - 1
    # and the message is an arrow from inventory to payment
    expect(waterfall.locator(".arrow")).to_have_count(1)
    expect(waterfall).to_contain_text("inventory → payment")
    # and the event table lists all ten events with both clocks
    rows = page.locator("table.events tbody tr")
    expect(rows).to_have_count(10)
    expect(rows.first.locator("td").nth(1)).to_have_text("saga.started")
    expect(rows.last.locator("td").nth(1)).to_have_text("saga.completed")
    reported, received = (rows.first.locator("td").nth(i).inner_text() for i in (5, 6))
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{6}", reported), reported
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{6}", received), received
    # reported and received within seconds: a skew is shown but not flagged
    expect(rows.first.locator("td").nth(7)).to_have_text(re.compile(r"^-?[\d.]+ (ms|s)$"))
    expect(page.locator(".facts .flag")).to_have_count(0)


def test_a_new_event_appears_on_the_open_detail_page_within_a_second(page_for, e2e) -> None:
    # given a viewer looking at the running saga, with live updates connected
    keys = _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/order-1003")
    _wait_live(page)
    events = page.locator("table.events tbody tr")
    expect(events).to_have_count(2)
    version = int(page.locator("#saga-body").get_attribute("data-version"))
    page.evaluate("window.__sameDocument = true")
    # when inventory reports that the step succeeded
    e2e.post_events(
        keys["inventory"],
        [
            {"id": "c3", "saga_id": "order-1003", "type": "step.succeeded", "step": "reserve"}
            | {"occurred_at": ago(0)}
        ],
    )
    # then within a second the event is in the table and the bar turned green
    expect(events).to_have_count(3, timeout=1000)
    expect(events.last.locator("td").nth(1)).to_have_text("step.succeeded")
    expect(page.locator(".waterfall .bar").first).to_have_class(re.compile(r"\bout-succeeded\b"))
    expect(page.locator("#saga-body")).to_have_attribute("data-version", str(version + 1))
    # without a page load
    assert page.evaluate("window.__sameDocument") is True


def test_a_row_of_the_open_list_changes_status_live(page_for, e2e) -> None:
    # given a viewer on the saga list, with live updates connected
    keys = _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    _wait_live(page)
    row = page.locator('tr[data-saga-id="order-1003"]')
    expect(row.locator(".status")).to_have_text("running")
    page.evaluate("window.__sameDocument = true")
    # when the running saga completes
    e2e.post_events(
        keys["inventory"],
        [
            {"id": "c3", "saga_id": "order-1003", "type": "step.succeeded", "step": "reserve"}
            | {"occurred_at": ago(0.2)},
            {"id": "c4", "saga_id": "order-1003", "type": "saga.completed"}
            | {"occurred_at": ago(0.1)},
        ],
    )
    # then within a second its row says so, the other rows stay, and the page was not reloaded
    expect(row.locator(".status")).to_have_text("completed", timeout=1000)
    expect(_rows(page)).to_have_count(3)
    assert page.evaluate("window.__sameDocument") is True


RECORD_SOCKETS = """
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = function (...args) {
    const socket = new Native(...args);
    window.__sockets.push(socket);
    return socket;
  };
  window.WebSocket.prototype = Native.prototype;
"""


@pytest.mark.parametrize("path", ["/sagas/order-1003", "/sagas/"], ids=["detail", "list"])
def test_after_a_dropped_connection_the_page_catches_up(page_for, e2e, path) -> None:
    # given a viewer on a live page whose websocket we can reach
    keys = _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    page.add_init_script(RECORD_SOCKETS)
    login(page, "vera", path)
    _wait_live(page)
    page.evaluate("window.__sameDocument = true")
    # when the connection drops, and the saga completes while it is down
    page.evaluate("window.__sockets.at(-1).close()")
    expect(page.locator("#live-status")).to_have_text("○ reconnecting")
    e2e.post_events(
        keys["inventory"],
        [{"id": "c4", "saga_id": "order-1003", "type": "saga.completed", "occurred_at": ago(0)}],
    )
    # then once it is back (after about a second) the page shows the missed change
    _wait_live(page)
    status = ".facts .status" if path != "/sagas/" else 'tr[data-saga-id="order-1003"] .status'
    expect(page.locator(status)).to_have_text("completed", timeout=2000)
    assert page.evaluate("window.__sameDocument") is True


def test_markup_in_saga_id_step_and_payload_renders_as_text(page_for, e2e) -> None:
    # given a saga whose id, step name and payload hold a script tag
    key = service_key_create(service_name="payment").secret
    e2e.post_events(
        key,
        [
            {"id": "x1", "saga_id": XSS, "type": "saga.started", "saga_type": "order"}
            | {"occurred_at": ago(5)},
            {"id": "x2", "saga_id": XSS, "type": "step.failed", "step": XSS}
            | {"occurred_at": ago(4), "payload": {"note": XSS}},
        ],
    )
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    # when the viewer looks at the list, then the id is text and no script ran
    link = page.get_by_role("link", name=XSS)
    expect(link).to_be_visible()
    _assert_no_injected_script(page)
    # when they open the saga
    link.click()
    expect(page).to_have_url(re.compile(r"/sagas/%3Cscript%3E"))
    assert unquote(urlsplit(page.url).path) == f"/sagas/{XSS}"
    # then the id, the step and the payload are shown as text
    expect(page.get_by_role("heading", level=1)).to_have_text(XSS)
    expect(page.locator(".lane-name strong")).to_have_text([XSS])
    page.locator("table.events summary").first.click()
    expect(page.locator("table.events details pre").first).to_contain_text(XSS)
    expect(page.locator("table.events details pre").first).to_be_visible()
    # and no script element was made from them, and none ran
    _assert_no_injected_script(page)


def _assert_no_injected_script(page: Any) -> None:
    injected = page.evaluate(
        "Array.from(document.querySelectorAll('script'))"
        ".filter((s) => s.textContent.includes('__xss')).length"
    )
    assert injected == 0
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_tab_from_the_top_reaches_the_filter_controls(page_for, e2e) -> None:
    # given a viewer who has just opened the saga list
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    page.goto("/sagas/")
    # when they press Tab, the first stop is the skip link, and it shows
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    # when they keep tabbing
    reached = []
    for _ in range(20):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.getAttribute('name')"))
        if reached[-1] == "status":
            break
    # then they pass the type filter and land on the status filter
    assert reached[-2:] == ["type", "status"], reached
    expect(page.get_by_label("Status")).to_be_focused()
    # and from a fresh page the skip link jumps past the header to the filters
    page.goto("/sagas/")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Type")).to_be_focused()


PAGES = {
    "overview": ("/", "Overview"),
    "list": ("/sagas/", "Sagas"),
    "detail": ("/sagas/order-1001", "order-1001"),
    "services": ("/services/", "Services"),
}


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_every_page_renders_without_errors_or_sideways_scroll(page_for, e2e, viewport) -> None:
    # given sagas, and an admin (who also sees the key form) at this width
    _sagas(e2e)
    user_create("admin", "ada")
    page = page_for(viewport)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console", lambda m: errors.append(f"{m.text} {m.location}") if m.type == "error" else None
    )
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    width = viewport["width"]
    page.goto("/login/")
    screenshot(page, f"login-{width}")
    _assert_fits(page, width)
    login(page, "ada", "/")
    for name, (path, heading) in PAGES.items():
        # when they open the page
        page.goto(path)
        page.wait_for_load_state("networkidle")
        # then it has its heading, fits the width, and no script failed
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        screenshot(page, f"{name}-{width}")
        _assert_fits(page, width)
    assert errors == []


def _assert_fits(page: Any, width: int) -> None:
    scroll_width = page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= width, f"{page.url} is {scroll_width} px wide at {width} px"


def test_the_overview_tiles_link_to_the_filtered_list(page_for, e2e) -> None:
    # given three sagas, one compensated, and a viewer on the overview
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/")
    tile = page.locator("a.tile").filter(has_text="compensated")
    expect(tile.locator("strong")).to_have_text("1")
    # when they pick the 24 h window and follow the compensated tile
    page.get_by_role("link", name="24h", exact=True).click()
    expect(page).to_have_url(re.compile(r"window=24h"))
    page.locator("a.tile").filter(has_text="compensated").click()
    # then the list is filtered to that status and window
    expect(page).to_have_url(re.compile(r"/sagas/\?status=compensated&started_after=\d{4}-"))
    expect(_rows(page)).to_have_count(1)
    expect(_rows(page).first).to_have_attribute("data-saga-id", "order-1002")


def test_the_overview_chart_reads_time_in_utc_in_any_browser_time_zone(page_for, e2e) -> None:
    # given sagas, and a viewer whose browser is in New York (UTC-5 in November)
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for(timezone_id="America/New_York")
    login(page, "vera", "/")
    last = page.evaluate("JSON.parse(document.getElementById('chart-data').textContent).t.at(-1)")
    # when they point at the newest bucket of the throughput chart
    plot = page.locator("#chart-throughput .u-over")
    box = plot.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] - 1, box["y"] + box["height"] / 2)
    # then the legend names that bucket's time in UTC, as the footer promises
    at = datetime.fromtimestamp(last, UTC)
    expected = f"{at:%Y-%m-%d} {at.hour % 12 or 12}:{at:%M}{'am' if at.hour < 12 else 'pm'}"
    legend_time = page.locator("#chart-throughput .u-legend .u-series").first.locator(".u-value")
    expect(legend_time).to_have_text(expected)


def test_a_bad_filter_shows_its_error_in_place(page_for, e2e) -> None:
    # given a viewer on the saga list
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    # when they type an attribute filter without "="
    page.get_by_label("Attribute").fill("nonsense")
    page.get_by_label("Attribute").press("Enter")
    # then the list says what is wrong with it, and the URL keeps the bad filter to fix
    expect(page.locator("#saga-table [role=alert]")).to_contain_text("key=value")
    expect(page).to_have_url(re.compile(r"attr=nonsense"))
    expect(_rows(page)).to_have_count(0)


def test_a_several_status_filter_from_a_link_survives_changing_another_filter(
    page_for, e2e
) -> None:
    # given a viewer who followed a link filtering on two statuses at once
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/?status=completed,compensated")
    expect(_rows(page)).to_have_count(2)
    # then the status control shows that filter
    expect(page.get_by_label("Status")).to_have_value("completed,compensated")
    # when they narrow by type as well
    page.get_by_label("Type").fill("order")
    page.get_by_label("Type").press("Enter")
    # then both filters are in the URL and the same two sagas are listed
    expect(page).to_have_url(re.compile(r"type=order"))
    assert "status=completed%2Ccompensated" in page.url, page.url
    expect(_rows(page)).to_have_count(2)


def test_the_banner_counts_only_changed_sagas_the_filter_would_show(page_for, e2e) -> None:
    # given a viewer who filtered the list to compensated sagas, without a reload
    keys = _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    _wait_live(page)
    page.get_by_label("Status").select_option("compensated")
    expect(_rows(page)).to_have_count(1)
    banner = page.locator("#new-sagas")
    expect(banner).to_be_hidden()
    # when a saga the filter excludes starts (running), and one already shown changes
    e2e.post_events(
        keys["payment"],
        [
            {"id": "n1", "saga_id": "order-2000", "type": "saga.started", "saga_type": "order"}
            | {"occurred_at": ago(0)},
        ],
    )
    # then no banner: "show them" would show nothing new (the server was asked)
    page.wait_for_timeout(2500)
    expect(banner).to_be_hidden()
    # when a saga that the filter matches arrives
    e2e.post_events(
        keys["payment"],
        [
            {"id": "n2", "saga_id": "order-2001", "type": "saga.started", "saga_type": "order"}
            | {"occurred_at": ago(1)},
            {"id": "n3", "saga_id": "order-2001", "type": "saga.compensated"}
            | {"occurred_at": ago(0)},
        ],
    )
    # then the banner counts it, and its link leads to the first page of the current filter
    expect(banner).to_be_visible(timeout=3000)
    expect(banner).to_have_text("1 newer saga matches this filter — show it")
    banner.get_by_role("link").click()
    expect(page).to_have_url(re.compile(r"status=compensated"))
    expect(_rows(page)).to_have_count(2)
    expect(banner).to_be_hidden()


def test_back_and_forward_keep_the_filter_controls_in_step_with_the_url(page_for, e2e) -> None:
    # given a viewer on the saga list
    _sagas(e2e)
    user_create("viewer", "vera")
    page = page_for()
    login(page, "vera", "/sagas/")
    expect(_rows(page)).to_have_count(3)
    # when they pick a status, then type a saga id prefix and press Enter
    page.get_by_label("Status").select_option("compensated")
    expect(_rows(page)).to_have_count(1)
    length = page.evaluate("history.length")
    page.get_by_label("Saga id").fill("order-100")
    page.get_by_label("Saga id").press("Enter")
    expect(page).to_have_url(re.compile(r"saga_id=order-100"))
    # then Enter made one history entry, not two (change and submit)
    page.wait_for_timeout(300)
    assert page.evaluate("history.length") == length + 1
    # and pressing Filter with nothing changed makes none
    page.get_by_role("button", name="Filter").click()
    page.wait_for_timeout(300)
    assert page.evaluate("history.length") == length + 1
    # when they go back once
    page.go_back()
    # then the controls show the filter of the address bar: the status, no saga id
    expect(page).to_have_url(re.compile(r"status=compensated"))
    expect(page).not_to_have_url(re.compile(r"saga_id=order"))
    expect(page.get_by_label("Status")).to_have_value("compensated")
    expect(page.get_by_label("Saga id")).to_have_value("")
    # when they go back again, and change another filter
    page.go_back()
    expect(page).to_have_url(re.compile(r"/sagas/$"))
    expect(page.get_by_label("Status")).to_have_value("")
    page.get_by_label("Status").select_option("running")
    # then the new filter holds only what the controls show (nothing stale kept or lost)
    expect(page).to_have_url(re.compile(r"status=running"))
    assert "saga_id=order" not in page.url, page.url
    expect(_rows(page)).to_have_count(1)
    # and forward shows the controls of that entry again
    page.go_back()
    page.go_forward()
    expect(page.get_by_label("Status")).to_have_value("running")


def test_an_operator_requeues_a_dead_outbox_message_from_the_page(page_for, e2e) -> None:
    # given dead and pending outbox messages, and an operator
    from django.db import transaction

    import outbox
    from outbox.models import OutboxMessage

    with transaction.atomic():
        dead = outbox.publish(topic="alerts", key="order-1001", type="alert.stuck", payload={})
        outbox.publish(topic="orders", key="order-1002", type="order.paid", payload={})
    OutboxMessage.objects.filter(seq=dead.seq).update(
        status="dead", attempts=10, last_error="TransportError: RabbitMQ did not confirm"
    )
    user_create("operator", "olga")
    page = page_for()
    login(page, "olga", "/outbox/")
    # then the page shows the counts and the dead message with its error
    expect(page.get_by_role("heading", level=1)).to_have_text("Outbox")
    expect(page.locator("dl.facts")).to_contain_text("Pending")
    expect(page.locator("table.outbox")).to_contain_text("RabbitMQ did not confirm")
    screenshot(page, "dashboard-outbox")
    # when they press Requeue
    page.get_by_role("button", name=f"Requeue message {dead.message_id}").click()
    # then the message is pending again and the page says so
    expect(page.locator("p.notice")).to_have_text("Requeued 1 message.")
    expect(page.locator("table.outbox")).to_contain_text("No dead messages.")
