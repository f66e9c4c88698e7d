"""Dashboard pages for detection: incidents, saga types, badges, the overview's counts.

Incidents come from real events: ingest through the API, then one detector pass
(``detect_pass``) at a given time. No sleeping: a saga deadline in the past makes
"stuck" fire at once, a non-retryable failure and a failed compensation fire on sight.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from outbox.models import OutboxMessage
from tests.conftest import role_group
from tracking.detector import detect_pass
from tracking.models import Incident, IncidentStatus, Saga, SagaType
from tracking.policy import policy_load

RESOLVED = "sagaadmin.incident.resolved"
ACKNOWLEDGED = "sagaadmin.incident.acknowledged"


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def ev(saga_id: str, n: int, type_: str, ago: float, **fields: Any) -> dict[str, Any]:
    """Event ``n`` of a saga, reported ``ago`` seconds before now."""
    at = datetime.now(UTC) - timedelta(seconds=ago)
    return {
        "id": f"{saga_id}-{n}",
        "saga_id": saga_id,
        "type": type_,
        "occurred_at": iso(at),
    } | fields


@pytest.fixture
def incidents(api) -> dict[str, Incident]:
    """Three open incidents, by kind, from one detector pass.

    stuck-1 (order) is past its deadline; failed-1 (order) failed with a
    non-retryable error; comp-1 (shipping) could not undo its reserve step.
    """
    past_deadline = iso(datetime.now(UTC) - timedelta(seconds=5))
    declined = {"type": "CardDeclined", "message": "insufficient funds", "retryable": False}
    events = [
        ev("stuck-1", 1, "saga.started", 60, saga_type="order", deadline=past_deadline),
        ev("stuck-1", 2, "step.started", 50, step="charge"),
        ev("failed-1", 1, "saga.started", 60, saga_type="order"),
        ev("failed-1", 2, "step.started", 50, step="charge"),
        ev("failed-1", 3, "step.failed", 40, step="charge", error=declined),
        ev("comp-1", 1, "saga.started", 60, saga_type="shipping"),
        ev("comp-1", 2, "step.started", 50, step="reserve"),
        ev("comp-1", 3, "step.failed", 40, step="reserve"),
        ev("comp-1", 4, "compensation.started", 30, step="reserve"),
        ev("comp-1", 5, "compensation.failed", 20, step="reserve"),
    ]
    assert api.batch(events).json()["accepted"] == len(events)
    result = detect_pass(now=datetime.now(UTC))
    assert result.opened == 3
    return {i.kind: i for i in Incident.objects.select_related("saga")}


@pytest.fixture(autouse=True)
def admins_edit_thresholds(db) -> None:
    """What migration 0010 gives the admin group.

    ``role_group`` re-creates a group flushed by an earlier transactional test
    with migration 0004's permissions only, which predate thresholds.
    """
    edit = Permission.objects.get(content_type__app_label="tracking", codename="edit_thresholds")
    role_group("admin").permissions.add(edit)


def types_create(*names: str) -> None:
    """The ``SagaType`` rows ingest would create after its commit.

    Ingest creates them in ``transaction.on_commit``, which never runs inside a
    test's transaction (and a process remembers the names it created already).
    """
    for name in names:
        SagaType.objects.get_or_create(name=name)


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-incident-id="(\d+)"', html)]


def _forms(html: str) -> list[tuple[str, str]]:
    """(incident id, action) of every acknowledge/resolve form on the page."""
    return re.findall(r'action="/incidents/(\d+)/(acknowledge|resolve)"', html)


def _username(client: Client) -> str:
    user = get_user_model().objects.get(pk=client.session["_auth_user_id"])
    return str(user.get_username())


def _outbox(type_: str) -> list[OutboxMessage]:
    return list(OutboxMessage.objects.filter(type=type_).order_by("seq"))


# -- access ----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/incidents/", "/saga-types/"])
def test_the_pages_need_a_login_and_a_role(db, role_client, url) -> None:
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
    assert role_client(None).get(url).status_code == 403
    assert role_client("viewer").get(url).status_code == 200


def test_a_viewer_sees_every_unresolved_incident_and_no_forms(role_client, incidents) -> None:
    # when a viewer opens the incidents page
    html = role_client("viewer").get("/incidents/").content.decode()
    # then all three are listed, newest first (same opening time: highest id first)
    assert _ids(html) == sorted((i.pk for i in incidents.values()), reverse=True)
    stuck = re.search(rf'<tr id="incident-{incidents["stuck"].pk}".*?</tr>', html, re.S)
    assert stuck is not None
    row = stuck.group(0)
    assert '<span class="incident incident-stuck">stuck</span>' in row
    assert '<a href="/sagas/stuck-1" class="mono">stuck-1</a>' in row
    assert '<small class="muted">order</small></td>' in row  # the saga type, under its id
    assert "past its deadline" in row
    assert '<span class="mono">stuck-1-1</span> saga.started' in row  # the evidence
    assert '<span class="istatus istatus-open">open</span>' in row
    # and there is nothing to press
    assert _forms(html) == []
    assert 'name="note"' not in html


def test_an_operator_gets_acknowledge_and_resolve_forms_per_unresolved_incident(
    role_client, incidents
) -> None:
    html = role_client("operator").get("/incidents/?kind=stuck").content.decode()
    pk = str(incidents["stuck"].pk)
    assert sorted(_forms(html)) == [(pk, "acknowledge"), (pk, "resolve")]
    # each form returns to the filtered list it was on
    assert html.count('<input type="hidden" name="next" value="/incidents/?kind=stuck">') == 2
    tokens = re.findall(
        r'action="/incidents/\d+/\w+"><input type="hidden" name="csrfmiddlewaretoken"', html
    )
    assert len(tokens) == 2


# -- acknowledge and resolve -----------------------------------------------------


def test_an_operator_acknowledges_an_incident_with_a_note(role_client, incidents) -> None:
    # given an operator on the list filtered to stuck incidents
    client = role_client("operator")
    incident = incidents["stuck"]
    # when they acknowledge it with a note
    response = client.post(
        f"/incidents/{incident.pk}/acknowledge",
        {"note": "looking at the payment gateway", "next": "/incidents/?kind=stuck"},
    )
    # then they are back on the filtered list, which says so
    assert response.status_code == 302
    assert response["Location"] == "/incidents/?kind=stuck"
    html = client.get(response["Location"]).content.decode()
    assert f"Incident {incident.pk} (stuck on stuck-1) acknowledged." in html
    # and the row shows who acknowledged it; only the resolve form is left
    assert f"acknowledged by {_username(client)}" in html
    assert "<q>looking at the payment gateway</q>" in html
    assert _forms(html) == [(str(incident.pk), "resolve")]
    # and the database and the outbox have it
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.ACKNOWLEDGED
    assert incident.acknowledged_by == _username(client)
    assert incident.acknowledge_note == "looking at the payment gateway"
    [message] = _outbox(ACKNOWLEDGED)
    assert json.loads(message.payload)["incident_id"] == incident.pk
    assert message.aggregateid == "stuck-1"
    # and the audit page lists it, and its action filter offers incident handling
    audit = client.get("/audit/?action=acknowledge_incident").content.decode()
    assert '<option value="acknowledge_incident" selected>' in audit
    assert "looking at the payment gateway" in audit


def test_an_operator_resolves_an_incident_and_it_leaves_the_unresolved_list(
    role_client, incidents
) -> None:
    client = role_client("operator")
    incident = incidents["retries_exhausted"]
    saga_version = Saga.objects.get(saga_id="failed-1").version
    before = client.get("/incidents/").content.decode()
    assert incident.pk in _ids(before)
    assert re.search(r'id="nav-incidents"[^>]*>3<', before)
    # when they resolve it with a note
    response = client.post(
        f"/incidents/{incident.pk}/resolve", {"note": "refunded by hand", "next": "/incidents/"}
    )
    assert response.status_code == 302
    assert response["Location"] == "/incidents/"
    # then the list no longer shows it, and the count in the navigation went down
    html = client.get("/incidents/").content.decode()
    assert f"Incident {incident.pk} (retries_exhausted on failed-1) resolved." in html
    assert incident.pk not in _ids(html)
    assert len(_ids(html)) == 2
    assert re.search(r'id="nav-incidents"[^>]*>2<', html)
    # and the resolved list shows it with the note
    resolved = client.get("/incidents/?state=resolved").content.decode()
    assert _ids(resolved) == [incident.pk]
    assert f"resolved by {_username(client)}" in resolved
    assert "<q>refunded by hand</q>" in resolved
    assert _forms(resolved) == []
    # and the row, the saga's badges and the outbox agree
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.RESOLVED
    assert incident.resolution == "operator"
    assert incident.resolved_by == _username(client)
    assert incident.resolution_note == "refunded by hand"
    saga = Saga.objects.get(saga_id="failed-1")
    assert saga.open_incidents == ""
    assert saga.version == saga_version + 1
    [message] = _outbox(RESOLVED)
    assert message.aggregateid == "failed-1"
    payload = json.loads(message.payload)
    assert payload["incident_id"] == incident.pk
    assert payload["note"] == "refunded by hand"


def test_resolving_without_a_note_shows_why_and_changes_nothing(role_client, incidents) -> None:
    client = role_client("operator")
    incident = incidents["stuck"]
    # when the operator resolves with a blank note
    response = client.post(
        f"/incidents/{incident.pk}/resolve", {"note": "   ", "next": "/incidents/?kind=stuck"}
    )
    # then the filtered list comes back with the reason, at the incident's form
    assert response.status_code == 400
    html = response.content.decode()
    assert "Traceback" not in html
    assert re.search(
        rf'role="alert">Incident {incident.pk} was not resolved: <strong>note</strong>: '
        r"[^<]*a note is required",
        html,
    )
    assert f'<p class="field-error" id="refused-{incident.pk}">' in html
    assert _ids(html) == [incident.pk]
    # and nothing changed
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.OPEN
    assert _outbox(RESOLVED) == []


def test_resolving_a_resolved_incident_is_refused_with_its_reason(role_client, incidents) -> None:
    client = role_client("operator")
    incident = incidents["stuck"]
    first = client.post(f"/incidents/{incident.pk}/resolve", {"note": "done", "next": "/"})
    assert first.status_code == 302
    # when a second operator, on a stale page, resolves it again
    again = role_client("operator").post(
        f"/incidents/{incident.pk}/resolve", {"note": "me too", "next": "/incidents/"}
    )
    # then they are told, and the first resolution stands
    assert again.status_code == 409
    assert "resolved already" in again.content.decode()
    incident.refresh_from_db()
    assert incident.resolution_note == "done"
    assert len(_outbox(RESOLVED)) == 1


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_a_viewer_may_not_act(role_client, incidents, action) -> None:
    incident = incidents["stuck"]
    response = role_client("viewer").post(
        f"/incidents/{incident.pk}/{action}", {"note": "x", "next": "/incidents/"}
    )
    assert response.status_code == 403
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.OPEN
    assert _outbox(RESOLVED) == [] and _outbox(ACKNOWLEDGED) == []


def test_the_actions_need_a_csrf_token(role_client, incidents) -> None:
    user = get_user_model().objects.get(pk=role_client("operator").session["_auth_user_id"])
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    url = f"/incidents/{incidents['stuck'].pk}/acknowledge"
    assert client.post(url, {"note": "", "next": "/incidents/"}).status_code == 403
    page = client.get("/incidents/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = client.post(url, {"note": "", "next": "/incidents/", "csrfmiddlewaretoken": token})
    assert response.status_code == 302


@pytest.mark.parametrize("next_url", ["https://evil.example/", "//evil.example/x", ""])
def test_the_form_returns_only_to_a_page_of_this_site(role_client, incidents, next_url) -> None:
    response = role_client("operator").post(
        f"/incidents/{incidents['stuck'].pk}/acknowledge", {"next": next_url}
    )
    assert response.status_code == 302
    assert response["Location"] == "/incidents/"


def test_an_unknown_incident_is_404(role_client, incidents) -> None:
    assert (
        role_client("operator").post("/incidents/999999/resolve", {"note": "x"}).status_code == 404
    )


# -- filters and pages -----------------------------------------------------------


def test_the_filters_come_from_the_url(role_client, incidents) -> None:
    client = role_client("viewer")

    def ids(query: str) -> list[int]:
        response = client.get(f"/incidents/?{query}")
        assert response.status_code == 200
        return _ids(response.content.decode())

    assert ids("kind=stuck") == [incidents["stuck"].pk]
    assert ids("saga_type=shipping") == [incidents["compensation_failed"].pk]
    assert ids("saga_id=failed-1") == [incidents["retries_exhausted"].pk]
    assert ids("saga_type=order&kind=compensation_failed") == []
    assert ids("state=resolved") == []
    assert len(ids("state=open")) == 3
    # the form shows the filter it applied
    html = client.get("/incidents/?state=open&kind=stuck").content.decode()
    assert '<option value="open" selected>' in html
    assert '<option value="stuck" selected>' in html


def test_states_follow_acknowledge_and_resolve(role_client, incidents) -> None:
    operator = role_client("operator")
    operator.post(f"/incidents/{incidents['stuck'].pk}/acknowledge", {"note": ""})
    operator.post(f"/incidents/{incidents['compensation_failed'].pk}/resolve", {"note": "fixed"})
    client = role_client("viewer")
    ids = {s: _ids(client.get(f"/incidents/?state={s}").content.decode()) for s in ("open", "all")}
    assert ids["open"] == [incidents["retries_exhausted"].pk]
    assert sorted(ids["all"]) == sorted(i.pk for i in incidents.values())
    acknowledged = client.get("/incidents/?state=acknowledged").content.decode()
    assert _ids(acknowledged) == [incidents["stuck"].pk]
    unresolved = client.get("/incidents/").content.decode()
    assert sorted(_ids(unresolved)) == sorted(
        [incidents["stuck"].pk, incidents["retries_exhausted"].pk]
    )


def test_a_bad_filter_is_named_not_raised(role_client, incidents) -> None:
    response = role_client("viewer").get("/incidents/?kind=bogus")
    assert response.status_code == 400
    html = response.content.decode()
    assert '<p class="error" role="alert"><strong>kind</strong>: one of stuck' in html
    assert _ids(html) == []


def test_the_next_page_link_follows_the_keyset_cursor(role_client, api) -> None:
    # given 51 resolved incidents of one saga, opened a second apart
    assert api.batch([ev("many", 1, "saga.started", 5, saga_type="order")]).json()["accepted"]
    saga = Saga.objects.get(saga_id="many")
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    Incident.objects.bulk_create(
        Incident(
            saga=saga,
            saga_type="order",
            kind="stuck",
            status=IncidentStatus.RESOLVED,
            reason=f"number {n}",
            opened_at=t0 + timedelta(seconds=n),
            resolved_at=t0 + timedelta(seconds=n, milliseconds=500),
            resolution="auto",
        )
        for n in range(51)
    )
    client = role_client("viewer")
    first = client.get("/incidents/?state=resolved&kind=stuck").content.decode()
    assert len(_ids(first)) == 50
    link = re.search(r'<a href="\?([^"]+)" rel="next">', first)
    assert link is not None
    query = link.group(1).replace("&amp;", "&")
    assert "kind=stuck" in query and "state=resolved" in query
    second = client.get(f"/incidents/?{query}").content.decode()
    assert len(_ids(second)) == 1
    assert 'rel="next"' not in second
    assert set(_ids(first)) | set(_ids(second)) == set(
        Incident.objects.values_list("pk", flat=True)
    )
    assert "number 0<" in second  # the oldest comes last


# -- badges: navigation, saga list, detail page, overview -----------------------


def test_the_navigation_counts_unresolved_incidents_on_every_page(role_client, incidents) -> None:
    client = role_client("viewer")
    for url in ["/", "/sagas/", "/sagas/stuck-1", "/services/", "/outbox/", "/saga-types/"]:
        html = client.get(url).content.decode()
        assert re.search(r'id="nav-incidents" title="3 unresolved incidents">3<', html), url


def test_without_incidents_the_navigation_shows_no_count(role_client) -> None:
    html = role_client("viewer").get("/sagas/").content.decode()
    assert '<a href="/incidents/"' in html
    assert "nav-incidents" not in html


def test_saga_rows_show_open_incident_badges_and_the_flag_filter_finds_them(
    role_client, incidents
) -> None:
    client = role_client("viewer")
    html = client.get("/sagas/").content.decode()
    row = re.search(r'<tr id="row-\d+" data-saga-id="stuck-1".*?</tr>', html, re.S).group(0)
    assert 'class="incident incident-stuck"' in row
    assert "incident-retries_exhausted" not in row
    # the flag filter offers the incident kinds, and filters on them
    assert '<optgroup label="Open incident">' in html
    assert '<option value="in_doubt" >in_doubt</option>' in html
    listed = client.get("/sagas/?flag=compensation_failed").content.decode()
    assert re.findall(r'data-saga-id="([^"]+)"', listed) == ["comp-1"]
    # the live row fragment is the same row
    fragment = client.get("/live/saga-rows?id=stuck-1").content.decode()
    assert row in fragment


def test_the_detail_page_shows_badges_and_every_incident_of_the_saga(
    role_client, incidents
) -> None:
    operator = role_client("operator")
    html = operator.get("/sagas/stuck-1").content.decode()
    facts = re.search(r"<dt>Open incidents</dt><dd>(.*?)</dd>", html, re.S).group(1)
    assert 'class="incident incident-stuck"' in facts
    pk = incidents["stuck"].pk
    assert _ids(html) == [pk]
    assert '<input type="hidden" name="next" value="/sagas/stuck-1">' in html
    # when the operator resolves it from the detail page
    response = operator.post(
        f"/incidents/{pk}/resolve", {"note": "cancelled upstream", "next": "/sagas/stuck-1"}
    )
    assert response["Location"] == "/sagas/stuck-1"
    # then the badge is gone and the panel still lists it, resolved, without forms
    html = operator.get("/sagas/stuck-1").content.decode()
    assert "<dt>Open incidents</dt><dd>none</dd>" in html
    assert _ids(html) == [pk]
    assert '<span class="istatus istatus-resolved">resolved</span>' in html
    assert _forms(html) == []


def test_a_saga_without_incidents_has_no_panel(role_client, incidents, api) -> None:
    api.batch([ev("calm-1", 1, "saga.started", 5, saga_type="order")])
    html = role_client("operator").get("/sagas/calm-1").content.decode()
    assert "<dt>Open incidents</dt><dd>none</dd>" in html
    assert 'id="incidents-title"' not in html
    assert 'id="incidents-title"' in role_client("operator").get("/sagas/comp-1").content.decode()


def test_a_refused_action_on_the_detail_page_renders_the_detail_page(
    role_client, incidents
) -> None:
    pk = incidents["compensation_failed"].pk
    response = role_client("operator").post(
        f"/incidents/{pk}/resolve", {"note": "", "next": "/sagas/comp-1?events=all"}
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert '<h1 id="saga-title"><span class="mono">comp-1</span></h1>' in html
    assert "a note is required" in html
    assert '<input type="hidden" name="next" value="/sagas/comp-1?events=all">' in html


def test_a_viewer_sees_the_detail_panel_without_forms(role_client, incidents) -> None:
    html = role_client("viewer").get("/sagas/comp-1").content.decode()
    assert _ids(html) == [incidents["compensation_failed"].pk]
    assert _forms(html) == []


def test_the_overview_counts_open_incidents_by_kind_with_links(role_client, incidents) -> None:
    role_client("operator").post(
        f"/incidents/{incidents['stuck'].pk}/acknowledge", {"note": "on it"}
    )
    html = role_client("viewer").get("/").content.decode()
    counts = dict(re.findall(r'href="/incidents/\?kind=(\w+)"><strong>(\d+)</strong>', html))
    # acknowledged is still unresolved
    assert counts == {
        "stuck": "1",
        "compensation_failed": "1",
        "retries_exhausted": "1",
        "in_doubt": "0",
        "anomaly": "0",
    }


def test_markup_in_an_incident_is_escaped(role_client, api) -> None:
    script = "<script>alert(1)</script>"
    no = {"type": script, "message": script, "retryable": False}
    api.batch(
        [
            ev("x-1", 1, "saga.started", 60, saga_type="order"),
            ev("x-1", 2, "step.started", 51, step=script),
            ev("x-1", 3, "step.failed", 50, step=script, error=no),
        ]
    )
    types_create("order")
    assert detect_pass(now=datetime.now(UTC)).opened == 1
    for url in ["/incidents/", "/sagas/x-1", "/saga-types/"]:
        html = role_client("operator").get(url).content.decode()
        assert script not in html, url
        assert "&lt;script&gt;" in html, url


# -- saga types ------------------------------------------------------------------


@pytest.fixture
def learned(api, settings) -> None:
    """order: three finished charge attempts (one failed), one of ship; learning after 3."""
    settings.SAGAADMIN = {**settings.SAGAADMIN, "LEARN_MIN_SAMPLES": 3}
    events = []
    for n, (seconds, outcome) in enumerate([(1, "succeeded"), (2, "succeeded"), (4, "failed")]):
        sid = f"learn-{n}"
        events += [
            ev(sid, 1, "saga.started", 60, saga_type="order"),
            ev(sid, 2, "step.started", 30, step="charge"),
            ev(sid, 3, f"step.{outcome}", 30 - seconds, step="charge"),
        ]
    events += [ev("learn-0", 4, "step.started", 20, step="ship")]
    events += [ev("learn-0", 5, "step.succeeded", 19, step="ship")]
    events += [ev("ship-1", 1, "saga.started", 5, saga_type="shipping")]
    assert api.batch(events).json()["accepted"] == len(events)
    types_create("order", "shipping")


def _card(html: str, name: str) -> str:
    pk = SagaType.objects.get(name=name).pk
    card = re.search(rf'<section class="card type-card" id="type-{pk}".*?</section>', html, re.S)
    assert card is not None
    return card.group(0)


def test_the_saga_types_page_shows_thresholds_and_learned_durations(role_client, learned) -> None:
    html = role_client("viewer").get("/saga-types/").content.decode()
    order = _card(html, "order")
    assert "<dt>Stuck after</dt><dd>default 900 s (15 min)</dd>" in order
    assert "<dt>Max attempts</dt><dd>default 5</dd>" in order
    assert "<dt>In doubt after</dt><dd>default 300 s (5 min)</dd>" in order
    charge = re.search(r'<tr><td class="mono">charge</td>.*?</tr>', order, re.S).group(0)
    assert "<td>3</td><td>33.3 %</td>" in charge
    bound = policy_load().step_bound("order", "charge")
    assert bound is not None and bound.source == "learned"
    assert f"<td>{bound.describe()}</td>" in charge
    ship = re.search(r'<tr><td class="mono">ship</td>.*?</tr>', order, re.S).group(0)
    assert "<td>learning (1 of 3 samples)</td>" in ship
    assert "No finished steps" in _card(html, "shipping")
    # a viewer gets no form
    assert 'name="stuck_after_seconds"' not in html


def test_an_admin_edits_the_thresholds_of_a_type(role_client, learned) -> None:
    admin = role_client("admin")
    html = admin.get("/saga-types/").content.decode()
    assert _card(html, "order").count('name="stuck_after_seconds"') == 1
    row = SagaType.objects.get(name="order")
    response = admin.post(
        "/saga-types/",
        {
            "name": "order",
            "stuck_after_seconds": "600",
            "max_attempts": "",
            "in_doubt_after_seconds": " 120 ",
            "step_thresholds": "charge=30\r\n\r\nship = 90\r\n",
        },
    )
    assert response.status_code == 302
    assert response["Location"] == f"/saga-types/#type-{row.pk}"
    row.refresh_from_db()
    assert row.stuck_after_seconds == 600
    assert row.max_attempts is None
    assert row.in_doubt_after_seconds == 120
    assert row.step_thresholds == {"charge": 30, "ship": 90}
    assert row.updated_by == _username(admin)
    card = _card(admin.get("/saga-types/").content.decode(), "order")
    assert "<dt>Stuck after</dt><dd>600 s (10 min)</dd>" in card
    assert "<td>30 s (configured)</td>" in card
    assert "<td>90 s (configured)</td>" in card  # no longer "learning"
    assert "charge=30\nship=90</textarea>" in card


@pytest.mark.parametrize(
    ("field", "changes", "message"),
    [
        ("stuck_after_seconds", {"stuck_after_seconds": "soon"}, "a whole number of seconds"),
        ("in_doubt_after_seconds", {"in_doubt_after_seconds": "0"}, "from 1 to 2592000"),
        ("max_attempts", {"max_attempts": "5000"}, "1000"),
        ("step_thresholds", {"step_thresholds": "charge"}, "line 1: write step=seconds"),
        ("step_thresholds", {"step_thresholds": "ship=5\ncharge=-3"}, "charge: a whole number"),
    ],
)
def test_a_bad_threshold_is_shown_at_its_field(role_client, learned, field, changes, message):
    row = SagaType.objects.get(name="order")
    form = {"name": "order", "stuck_after_seconds": "", "max_attempts": "", **changes}
    response = role_client("admin").post("/saga-types/", form)
    assert response.status_code == 400
    card = _card(response.content.decode(), "order")
    error = re.search(rf'<p class="field-error" id="t{row.pk}-{field}-error">([^<]*)</p>', card)
    assert error is not None, card
    assert message in error.group(1)
    assert f'aria-describedby="t{row.pk}-{field}-error"' in card
    assert '<details class="edit" open>' in card  # the form stays open with what was typed
    row.refresh_from_db()
    assert row.updated_at is None and row.stuck_after_seconds is None


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_only_admins_edit_thresholds(role_client, learned, role) -> None:
    client = role_client(role)
    assert 'name="stuck_after_seconds"' not in client.get("/saga-types/").content.decode()
    response = client.post("/saga-types/", {"name": "order", "stuck_after_seconds": "60"})
    assert response.status_code == 403
    assert SagaType.objects.get(name="order").stuck_after_seconds is None


def test_editing_an_unknown_type_is_404(role_client, learned) -> None:
    response = role_client("admin").post("/saga-types/", {"name": "nope", "max_attempts": "3"})
    assert response.status_code == 404
