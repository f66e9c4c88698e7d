"""Dashboard pages: roles, filters in the URL, keyset pages, escaping, keys."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

from tests.tracking.test_read_api import saga_events
from tracking.models import ServiceKey

PAGES = ["/", "/sagas/", "/services/", "/outbox/"]


@pytest.fixture
def sagas(api) -> None:
    events = []
    for i in range(5):
        events += saga_events(f"order-{i}", i, attrs={"order_id": i})
    events += saga_events("stuck-1", 10, status="running")
    assert api.batch(events).json()["rejected"] == 0


@pytest.mark.parametrize("url", PAGES)
def test_every_page_needs_a_login(db, url) -> None:
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


@pytest.mark.parametrize("url", PAGES)
def test_a_user_without_a_role_is_refused(role_client, url) -> None:
    assert role_client(None).get(url).status_code == 403


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
@pytest.mark.parametrize("url", PAGES)
def test_every_role_sees_every_page_and_its_name_in_the_header(
    role_client, sagas, url, role
) -> None:
    response = role_client(role).get(url)
    assert response.status_code == 200
    assert f'class="role role-{role}">{role}<' in response.content.decode()


def test_the_list_filters_from_the_url(role_client, sagas) -> None:
    html = role_client("viewer").get("/sagas/?status=running").content.decode()
    assert "stuck-1" in html
    assert "order-0" not in html
    html = role_client("viewer").get("/sagas/?attr=order_id%3D3").content.decode()
    assert re.findall(r'data-saga-id="([^"]+)"', html) == ["order-3"]


def test_a_bad_filter_is_shown_not_raised(role_client, sagas) -> None:
    response = role_client("viewer").get("/sagas/?attr=nonsense")
    assert response.status_code == 400
    assert "key=value" in response.content.decode()


def test_list_pages_follow_the_keyset_cursor(role_client, sagas) -> None:
    client = role_client("viewer")
    from tracking import selectors

    first = client.get("/sagas/?sort=started_at")
    ids = re.findall(r'data-saga-id="([^"]+)"', first.content.decode())
    assert ids[:2] == ["order-0", "order-1"]
    assert 'rel="next"' not in first.content.decode()  # 6 sagas fit in one page of 50
    page = selectors.saga_list(filters=selectors.SagaFilter(), sort="started_at", limit=4)
    second = client.get(f"/sagas/?sort=started_at&cursor={page.next_cursor}")
    assert re.findall(r'data-saga-id="([^"]+)"', second.content.decode()) == ["order-4", "stuck-1"]


def test_live_rows_fragment_renders_the_same_row_as_the_page(role_client, sagas) -> None:
    client = role_client("viewer")
    page = client.get("/sagas/").content.decode()
    fragment = client.get("/live/saga-rows?id=order-2").content.decode()
    row = re.search(r'<tr id="row-\d+" data-saga-id="order-2".*?</tr>', fragment, re.S)
    assert row is not None
    assert row.group(0) in page


def test_the_detail_page_shows_the_timeline_and_events(role_client, sagas) -> None:
    html = role_client("viewer").get("/sagas/order-1").content.decode()
    assert 'class="lane-name"><strong>charge</strong>' in html
    assert "saga.completed" in html
    assert 'data-version="1"' in html


def test_the_detail_page_shows_fifty_events_and_the_rest_on_request(api, role_client) -> None:
    start = {"id": "h0", "saga_id": "long", "saga_type": "order", "type": "saga.started"}
    beats = [{"id": f"h{i}", "saga_id": "long", "type": "heartbeat"} for i in range(1, 72)]
    events = [
        e | {"occurred_at": f"2026-11-26T10:{i // 60:02d}:{i % 60:02d}Z"}
        for i, e in enumerate([start, *beats])
    ]
    assert api.batch(events).json()["accepted"] == 72
    client = role_client("viewer")
    html = client.get("/sagas/long").content.decode()
    assert html.count("<tr><td>") == 50
    assert '<a href="?events=all">Show the other 22 events</a>' in html
    assert '<small class="mono">h49</small>' in html
    assert '<small class="mono">h50</small>' not in html
    everything = client.get("/sagas/long?events=all").content.decode()
    assert everything.count("<tr><td>") == 72
    assert "Show the other" not in everything
    assert '<small class="mono">h71</small>' in everything
    # a live refresh asks for the same URL, so an expanded table stays expanded
    assert 'hx-get="/sagas/long?events=all"' in everything


def test_markup_in_reported_strings_is_escaped(api, role_client) -> None:
    script = "<script>alert(1)</script>"
    api.batch(
        [
            {
                "id": "x",
                "saga_id": script,
                "type": "step.failed",
                "step": script,
                "occurred_at": "2026-11-26T10:00:00Z",
                "payload": {"h": script},
                "error": {"type": script, "message": script},
            }
        ]
    )
    client = role_client("viewer")
    for url in ["/sagas/", f"/sagas/{script}", f"/live/saga-rows?id={script}"]:
        html = client.get(url).content.decode()
        assert script not in html
        assert "&lt;script&gt;" in html


def test_only_admins_create_and_revoke_keys(role_client) -> None:
    assert role_client("operator").post("/services/keys", {"service": "billing"}).status_code == 403
    admin = role_client("admin")
    response = admin.post("/services/keys", {"service": "billing"}, follow=True)
    html = response.content.decode()
    secret = re.search(r'id="new-key" class="mono">(sa_[^<]+)<', html).group(1)
    assert "not shown again" in html
    assert secret not in admin.get("/services/").content.decode()  # shown once
    key = ServiceKey.objects.get(service__name="billing")
    assert role_client("operator").post(f"/services/keys/{key.prefix}/revoke").status_code == 403
    admin.post(f"/services/keys/{key.prefix}/revoke")
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_a_bad_service_name_is_a_clear_error(role_client) -> None:
    response = role_client("admin").post("/services/keys", {"service": "no spaces!"})
    assert response.status_code == 400
    assert "letters, digits" in response.content.decode()


def test_the_empty_list_tells_how_to_send_the_first_event(role_client) -> None:
    html = role_client("viewer").get("/sagas/").content.decode()
    assert "No sagas yet" in html
    assert "/api/v1/events" in html


def test_the_overview_counts_come_from_the_rollups_and_link_to_the_list(role_client, api) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    events = []
    for i in range(3):
        sid = f"ov-{i}"
        events += [
            {
                "id": f"{sid}-a",
                "saga_id": sid,
                "saga_type": "order",
                "type": "saga.started",
                "occurred_at": (now - timedelta(minutes=5)).isoformat(),
            },
            {
                "id": f"{sid}-b",
                "saga_id": sid,
                "type": "step.started",
                "step": "charge",
                "occurred_at": (now - timedelta(minutes=4)).isoformat(),
            },
        ]
        if i:
            events.append(
                {
                    "id": f"{sid}-c",
                    "saga_id": sid,
                    "type": "step.failed",
                    "step": "charge",
                    "occurred_at": (now - timedelta(minutes=3)).isoformat(),
                }
            )
    api.batch(events)
    html = role_client("viewer").get("/?window=15m").content.decode()
    tile = re.search(
        r'status=running&amp;started_after=[^"]+"><strong class="status-running">(\d+)<', html
    )
    assert tile is not None and tile.group(1) == "3"
    assert re.search(r"<td>2 / 2</td>", html)  # charge failed in both finished attempts
    data = re.search(r'id="chart-data" type="application/json">(.*?)</script>', html)
    assert data is not None
    chart = json.loads(data.group(1))
    assert sum(chart["started"]) == 3
    assert sum(chart["failed"]) == 0
    assert len(chart["t"]) == len(chart["started"]) >= 3
    assert "No finished steps" not in html


def test_the_event_rate_counts_each_event_once_whatever_the_number_of_keys(
    api, role_client
) -> None:
    from tracking.keys import service_key_create

    service_key_create(service_name="payment")
    service_key_create(service_name="payment")  # three keys now
    api.batch(
        [
            {
                "id": f"r{i}",
                "saga_id": "rate",
                "type": "heartbeat",
                "occurred_at": "2026-11-26T10:00:00Z",
            }
            for i in range(30)
        ]
    )
    html = role_client("viewer").get("/services/").content.decode()
    row = re.search(r'service=payment">payment</a></td>.*?</tr>', html, re.S).group(0)
    assert "<td>0.1</td>" in row  # 30 events / 300 s
    assert "<td>3</td>" in row  # active keys


def test_a_bad_service_name_keeps_the_page_whole(role_client, service_key) -> None:
    response = role_client("admin").post("/services/keys", {"service": "pâte"})
    html = response.content.decode()
    assert response.status_code == 400
    assert "letters, digits" in html
    assert "sa_" + service_key.key.prefix in html  # the existing keys are still listed


def test_trace_ids_link_to_the_tracing_ui_when_a_url_template_is_set(
    api, role_client, make_event, settings
) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    api.batch([make_event("saga.started", saga_id="traced", trace_id=trace)])
    viewer = role_client("viewer")
    html = viewer.get("/sagas/traced").content.decode()
    assert trace in html and "Open the trace" not in html  # no template: plain text
    settings.SAGAADMIN = {**settings.SAGAADMIN, "TRACE_URL": "http://jaeger:16686/trace/{trace_id}"}
    html = viewer.get("/sagas/traced").content.decode()
    assert f'<a href="http://jaeger:16686/trace/{trace}" target="_blank"' in html


def test_the_login_page_tells_nothing_about_the_database(db, settings) -> None:
    body = Client().get("/login/").content.decode()
    assert "make run" in body and "var/" in body
    assert settings.DATABASES["default"]["NAME"] not in body
    assert "admin-password" not in body


def test_saga_news_names_only_changed_sagas_on_the_first_page_of_the_filter(
    api, make_event, user_client
) -> None:
    """The list's banner asks which changed sagas it does not show that "show them" would."""
    # 52 compensated sagas (one more than a page), one running, started in id order
    events = []
    for i in range(52):
        saga = f"comp-{i:03d}"
        events.append(make_event("saga.started", saga_id=saga))
        events.append(make_event("saga.compensated", saga_id=saga))
    events.append(make_event("saga.started", saga_id="run-1"))
    assert all(r["status"] == "accepted" for r in api.batch(events).json()["results"])
    asked = ["comp-051", "comp-000", "run-1", "no-such-saga"]
    query = "&".join(f"id={i}" for i in asked)
    # newest first: comp-051 is on the first page, comp-000 (the oldest) is not;
    # run-1 is excluded by the filter
    response = user_client.get(f"/live/saga-news?status=compensated&{query}")
    assert response.status_code == 200
    assert response.json() == {"ids": ["comp-051"]}
    # oldest first, the other way round; with no filter, run-1 counts too
    response = user_client.get(f"/live/saga-news?status=compensated&sort=started_at&{query}")
    assert response.json() == {"ids": ["comp-000"]}
    response = user_client.get(f"/live/saga-news?{query}")
    assert set(response.json()["ids"]) == {"run-1", "comp-051"}
    # a bad filter says which field
    response = user_client.get("/live/saga-news?attr=nonsense&id=run-1")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "attr"


def test_saga_news_needs_a_role(role_client) -> None:
    assert role_client(None).get("/live/saga-news?id=x").status_code == 403


def test_an_error_a_retry_got_past_shows_as_recovered_while_the_saga_runs(
    api, make_event, user_client
) -> None:
    failed = {"type": "Timeout", "message": "provider slow", "retryable": True}
    api.batch(
        [
            make_event("saga.started", saga_id="rec-1"),
            make_event("step.started", saga_id="rec-1"),
            make_event("step.failed", saga_id="rec-1", error=failed),
        ]
    )
    page = user_client.get("/sagas/rec-1").content.decode()
    assert "Last error in charge" in page and "Recovered error" not in page
    # the operator's retry worked; the saga goes on (still running)
    api.batch(
        [
            make_event("step.started", saga_id="rec-1", attempt=2),
            make_event("step.succeeded", saga_id="rec-1", attempt=2),
        ]
    )
    page = user_client.get("/sagas/rec-1").content.decode()
    assert "Recovered error in charge" in page and "Last error" not in page


def test_a_running_sagas_duration_counts_seconds_not_zero_minutes() -> None:
    from datetime import UTC, datetime, timedelta

    from tracking.templatetags.saga_tags import elapsed

    now = datetime(2026, 11, 27, tzinfo=UTC)
    assert elapsed(now - timedelta(seconds=2), now) == "2.0 s"
    assert elapsed(now - timedelta(seconds=90), now) == "1.5 min"
    assert elapsed(None, now) == "\u2013"  # a dash


def test_a_failed_saga_never_reads_recovered(api, make_event, user_client) -> None:
    failed = {"type": "Timeout", "message": "provider slow", "retryable": True}
    api.batch(
        [
            make_event("saga.started", saga_id="rec-2"),
            make_event("step.started", saga_id="rec-2"),
            make_event("step.failed", saga_id="rec-2", error=failed),
            make_event("step.started", saga_id="rec-2", attempt=2),
            make_event("step.succeeded", saga_id="rec-2", attempt=2),
            make_event("saga.failed", saga_id="rec-2"),
        ]
    )
    page = user_client.get("/sagas/rec-2").content.decode()
    assert "Recovered error" not in page
