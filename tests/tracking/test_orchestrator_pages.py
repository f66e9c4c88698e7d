"""The Orchestrator page (definitions, circuits, runs not finished, the admins' start form)
and the run panel on an orchestrated saga's detail page.

Saga types from tests/orchestrator/sagas.py; a real worker runs them (``Worker().drain()``).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from orchestrator.engine import saga_start
from orchestrator.hooks import run_pause
from orchestrator.models import Circuit, SagaRun, StepRun
from orchestrator.worker import Worker
from tests.orchestrator import sagas

DASH = "\u2013"  # what the pages show for "none"


@pytest.fixture(autouse=True)
def _script(test_sagas: object) -> None:
    """Every action succeeds unless a test scripts its outcomes."""


@pytest.fixture
def viewer(role_client) -> Client:
    return role_client("viewer")


@pytest.fixture
def admin(role_client) -> Client:
    return role_client("admin")


def html_of(client: Client, url: str, headers: dict[str, str] | None = None) -> str:
    response = client.get(url, headers=headers or {})
    assert response.status_code == 200, response.content
    return str(response.content.decode())


def row(html: str, attribute: str, value: str) -> str:
    """The table row whose ``data-<attribute>`` is ``value``."""
    match = re.search(rf'<tr data-{attribute}="{re.escape(value)}">.*?</tr>', html, re.S)
    assert match is not None, f"no row with data-{attribute}={value!r}"
    return match.group(0)


def cells(tr: str) -> list[str]:
    return [c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]


def section(html: str, heading_id: str) -> str:
    match = re.search(rf'<section[^>]*aria-labelledby="{heading_id}".*?</section>', html, re.S)
    assert match is not None, f"no section {heading_id}"
    return match.group(0)


def start(client: Client, **form: str) -> Any:
    return client.post("/orchestrator/", form)


# -- access --------------------------------------------------------------------------


def test_the_page_needs_a_login_and_a_role(role_client) -> None:
    response = Client().get("/orchestrator/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
    assert role_client(None).get("/orchestrator/").status_code == 403
    html = html_of(role_client("viewer"), "/orchestrator/")
    assert '<a href="/orchestrator/" aria-current="page">Orchestrator</a>' in html
    assert '<a href="/orchestrator/" >Orchestrator</a>' in html_of(role_client("viewer"), "/")


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_only_admins_get_the_start_form_and_may_post_it(role_client, role) -> None:
    client = role_client(role)
    html = html_of(client, "/orchestrator/")
    assert "Start a saga" not in html
    assert 'name="saga_type"' not in html
    assert "Only admins start sagas." in html
    response = start(client, saga_type="test-order", saga_id="order-1", data="")
    assert response.status_code == 403
    assert not SagaRun.objects.exists()


# -- what the page shows -----------------------------------------------------------------


def test_the_definitions_are_listed_with_their_steps(viewer) -> None:
    definitions = html_of(viewer, "/orchestrator/").split('id="definitions-title"')[1]
    remote = re.search(
        r'<section class="card definition" id="definition-test-remote".*?</section>',
        definitions,
        re.S,
    )
    assert remote is not None
    card = remote.group(0)
    assert '<a href="/sagas/?type=test-remote">test-remote</a>' in card
    assert "reported as order" in card
    assert re.findall(r'<tr data-step="([^"]+)">', card) == [
        "reserve_stock",
        "charge_payment",
        "create_shipment",
    ]
    charge = row(card, "step", "charge_payment")
    assert '<span class="kind kind-remote">remote</span>' in charge
    assert '<span class="mono">payment · charge</span>' in charge
    assert '<span class="mono">undo_charge</span>' in charge
    assert "<td>3</td>" in charge
    assert "<td>30 s</td>" in charge
    reserve = row(card, "step", "reserve_stock")
    assert "in the worker" in reserve
    assert "<td>yes</td>" in reserve
    tcc = re.search(r'id="definition-test-tcc".*?</section>', definitions, re.S)
    assert tcc is not None
    assert "<td>confirm, cancel</td>" in row(tcc.group(0), "step", "hold_seat")
    assert cells(charge)[4:] == ["3", "none", "30 s", '<span class="mono">undo_charge</span>']
    slow = re.search(r'id="definition-test-slow-retry".*?</section>', definitions, re.S)
    assert slow is not None
    assert cells(row(slow.group(0), "step", "create_order"))[4:7] == ["3", "60 s", "30 s"]
    breaker = re.search(r'id="definition-test-breaker".*?</section>', definitions, re.S)
    assert breaker is not None
    assert cells(row(breaker.group(0), "step", "charge_payment"))[4:6] == ["10", f"0{DASH}60 s"]


def test_the_circuits_show_their_state(viewer) -> None:
    empty = section(html_of(viewer, "/orchestrator/"), "circuits-title")
    assert "No circuit yet" in empty
    now = timezone.now()
    Circuit.objects.create(
        service="payment",
        state="open",
        failures=5,
        opened_at=now - timedelta(seconds=10),
        retry_at=now + timedelta(seconds=20),
    )
    Circuit.objects.create(
        service="shipping",
        state="open",
        failures=5,
        opened_at=now - timedelta(minutes=5),
        retry_at=now - timedelta(minutes=4),
    )
    Circuit.objects.create(service="billing", state="half_open", failures=6, opened_at=now)
    Circuit.objects.create(service="stock", failures=1)
    circuits = section(html_of(viewer, "/orchestrator/"), "circuits-title")
    assert re.findall(r'<tr data-service="([^"]+)">', circuits) == [
        "billing",
        "payment",
        "shipping",
        "stock",
    ]
    payment = row(circuits, "service", "payment")
    assert '<span class="circuit circuit-open">open</span>' in payment
    assert "<td>5</td>" in payment
    assert "seconds from now" in payment
    assert "probe due" not in payment
    assert "probe due" in row(circuits, "service", "shipping")
    billing = row(circuits, "service", "billing")
    assert '<span class="circuit circuit-half_open">half-open</span>' in billing
    stock = row(circuits, "service", "stock")
    assert '<span class="circuit circuit-closed">closed</span>' in stock
    assert "<td>1</td>" in stock


def test_the_runs_not_finished_are_listed_with_why_they_wait(viewer) -> None:
    # given a finished saga, one waiting for a retry, one waiting for a reply, a paused one
    saga_start(saga_type="test-order", saga_id="done-1")
    Worker().drain()
    sagas.SCRIPT["forward:create_order"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id="retry-1")
    saga_start(saga_type="test-remote", saga_id="remote-1")
    Worker().drain()
    saga_start(saga_type="test-order", saga_id="paused-1")
    run_pause(saga_id="paused-1")
    # when a viewer opens the page
    runs = section(html_of(viewer, "/orchestrator/"), "runs-title")
    # then the unfinished ones are listed, newest first, linking to their saga
    assert re.findall(r'<tr data-saga-id="([^"]+)">', runs) == ["paused-1", "remote-1", "retry-1"]
    assert '<small class="muted">3</small>' in runs
    retry = row(runs, "saga-id", "retry-1")
    assert '<a href="/sagas/retry-1" class="mono">retry-1</a>' in retry
    assert '<span class="status status-running">running</span>' in retry
    assert "retry 2 of create_order at" in retry
    assert "from now" in retry  # next run: a minute from now
    remote = row(runs, "saga-id", "remote-1")
    assert "waiting for payment to answer charge" in remote
    paused = row(runs, "saga-id", "paused-1")
    assert '<span class="status status-paused">paused</span>' in paused
    assert "when resumed" in paused
    # and no worker holds any of them now (the lease column)
    assert [cells(row(runs, "saga-id", s))[5] for s in ("paused-1", "remote-1", "retry-1")] == [
        DASH,
        DASH,
        DASH,
    ]


def test_only_the_newest_runs_are_listed_with_the_total(viewer, monkeypatch) -> None:
    monkeypatch.setattr("tracking.views.RUNS_SHOWN", 2)
    for n in range(3):
        saga_start(saga_type="test-order", saga_id=f"order-{n}")
    runs = section(html_of(viewer, "/orchestrator/"), "runs-title")
    assert re.findall(r'<tr data-saga-id="([^"]+)">', runs) == ["order-2", "order-1"]
    assert "The newest 2 of 3" in runs


def test_a_run_held_by_a_worker_shows_its_lease(viewer) -> None:
    saga_start(saga_type="test-order", saga_id="held-1")
    until = timezone.now() + timedelta(seconds=30)
    SagaRun.objects.filter(saga_id="held-1").update(lease_owner="host:42:abc", lease_until=until)
    runs = section(html_of(viewer, "/orchestrator/"), "runs-title")
    assert (
        f'<span class="mono">host:42:abc</span> until <time datetime="{until:%Y-%m-%dT%H:%M:%S}'
        in row(runs, "saga-id", "held-1")
    )
    SagaRun.objects.filter(saga_id="held-1").update(lease_until=until - timedelta(minutes=5))
    runs = section(html_of(viewer, "/orchestrator/"), "runs-title")
    assert '<span class="mono">host:42:abc</span> (expired)' in row(runs, "saga-id", "held-1")


# -- starting a saga -----------------------------------------------------------------------


def test_an_admin_gets_a_form_with_every_defined_type(admin) -> None:
    html = html_of(admin, "/orchestrator/")
    form = section(html, "start-title")
    options = re.findall(r'<option value="([^"]*)"', form)
    assert options[0] == ""
    assert {"test-order", "test-remote", "test-tcc"} <= set(options[1:])
    assert options[1:] == sorted(options[1:])
    assert 'name="csrfmiddlewaretoken"' in form
    assert "aria-invalid" not in form


def test_an_admin_starts_a_saga_and_lands_on_its_page(admin) -> None:
    # when an admin starts a saga with data
    response = start(admin, saga_type="test-order", saga_id="order-42", data='{"order_id": 42}')
    # then the run exists and they are on the saga's page, which says so
    assert response.status_code == 302
    assert response["Location"] == "/sagas/order-42"
    run = SagaRun.objects.get(saga_id="order-42")
    assert (run.saga_type, run.data, run.status) == ("test-order", {"order_id": 42}, "running")
    html = html_of(admin, response["Location"])
    assert "Started test-order saga order-42." in html
    assert '<a class="orchestrated" href="#orch-title"' in html
    # when they start it again
    again = start(admin, saga_type="test-order", saga_id="order-42", data="")
    # then nothing new starts, and the page says so
    assert again.status_code == 302
    assert "Saga order-42 exists already (running): nothing new was started." in html_of(
        admin, again["Location"]
    )
    assert SagaRun.objects.count() == 1


def test_empty_data_starts_with_an_empty_object(admin) -> None:
    assert start(admin, saga_type="test-order", saga_id="order-43", data="  ").status_code == 302
    assert SagaRun.objects.get(saga_id="order-43").data == {}


@pytest.mark.parametrize(
    ("form", "field", "message"),
    [
        ({"saga_type": "", "saga_id": "x-1"}, "saga_type", "choose a saga type"),
        (
            {"saga_type": "nope", "saga_id": "x-1"},
            "saga_type",
            "no saga type &#x27;nope&#x27; is defined",
        ),
        ({"saga_type": "test-order", "saga_id": ""}, "saga_id", "1 to 200 characters"),
        ({"saga_type": "test-order", "saga_id": "x-1", "data": "[1, 2]"}, "data", "a JSON object"),
        (
            {"saga_type": "test-order", "saga_id": "x-1", "data": '{"a": 1,}'},
            "data",
            "not valid JSON: Illegal trailing comma before end of object (line 1, column 8)",
        ),
        (
            {"saga_type": "test-order", "saga_id": "x-1", "data": '{"amount": NaN}'},
            "data",
            "not valid JSON: NaN is not a JSON value",
        ),
    ],
)
def test_a_refused_start_is_shown_at_its_field(admin, form, field, message) -> None:
    response = start(admin, **form)
    assert response.status_code == 400
    html = response.content.decode()
    start_form = section(html, "start-title")
    # the error is at the field it names, which says it is wrong
    assert f'<p class="field-error" id="start-{field}-error">{message}</p>' in start_form
    assert re.search(
        rf'id="start-{field}"[^>]*aria-describedby="[^"]*start-{field}-error" aria-invalid="true"',
        start_form,
    )
    assert len(re.findall(r'class="field-error"', start_form)) == 1
    assert f"The saga was not started: <strong>{field}</strong>: {message}" in start_form
    # what was typed is still there
    if form.get("saga_id"):
        assert f'value="{form["saga_id"]}"' in start_form
    if form.get("data"):
        assert ">" + form["data"].replace('"', "&quot;") + "</textarea>" in start_form
    assert not SagaRun.objects.exists()


def test_a_saga_id_taken_by_another_type_is_refused_at_the_id(admin) -> None:
    saga_start(saga_type="test-order", saga_id="order-44")
    response = start(admin, saga_type="test-tcc", saga_id="order-44", data="")
    assert response.status_code == 400
    form = section(response.content.decode(), "start-title")
    assert (
        '<p class="field-error" id="start-saga_id-error">'
        "already used by a saga of type test-order</p>" in form
    )
    assert re.search(r'<option value="test-tcc" selected>', form)
    assert SagaRun.objects.get(saga_id="order-44").saga_type == "test-order"


def test_saga_ids_are_escaped(admin) -> None:
    response = start(admin, saga_type="test-order", saga_id="<b>x</b>", data="")
    assert response.status_code == 302
    assert response["Location"] == "/sagas/%3Cb%3Ex%3C/b%3E"
    html = html_of(admin, "/orchestrator/")
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in section(html, "runs-title")
    response = start(admin, saga_type="test-order", saga_id="x" * 201, data="<i>")
    assert "<i>" not in response.content.decode()


# -- the saga's detail page ---------------------------------------------------------------


def test_a_saga_that_is_not_orchestrated_has_no_badge_and_no_panel(viewer, api) -> None:
    event = {"id": "e-1", "saga_id": "ext-1", "type": "saga.started", "saga_type": "order"}
    api.batch([event | {"occurred_at": timezone.now().isoformat()}])
    html = html_of(viewer, "/sagas/ext-1")
    assert 'class="orchestrated"' not in html
    assert "Orchestrator run" not in html


def test_an_orchestrated_saga_shows_its_run_and_steps(viewer) -> None:
    # given a run whose charge is out as a command, after a local step
    saga_start(saga_type="test-remote", saga_id="remote-7")
    Worker().drain()
    command_id = StepRun.objects.get(run__saga_id="remote-7", name="charge_payment").command_id
    run = SagaRun.objects.get(saga_id="remote-7")
    # when a viewer opens its page
    html = html_of(viewer, "/sagas/remote-7")
    # then the header says orchestrated and the panel shows the run
    assert '<a class="orchestrated" href="#orch-title"' in html
    panel = section(html, "orch-title")
    assert '<dt>Run status</dt><dd><span class="status status-running">running</span></dd>' in panel
    assert "<dt>Paused</dt><dd>no</dd>" in panel
    assert "<dt>Waiting</dt><dd>waiting for payment to answer charge</dd>" in panel
    assert "<dt>Epoch</dt><dd>1</dd>" in panel
    assert f"<dt>Run version</dt><dd>{run.version}</dd>" in panel
    assert "<dt>Lease</dt><dd>no worker holds it</dd>" in panel
    assert "seconds from now" in panel  # next run: the command's deadline
    assert re.findall(r'<tr data-step="([^"]+)">', panel) == [
        "reserve_stock",
        "charge_payment",
        "create_shipment",
    ]
    reserve = row(panel, "step", "reserve_stock")
    assert '<span class="kind kind-local">local</span>' in reserve
    assert '<span class="status status-succeeded">succeeded</span>' in reserve
    assert "<td>1</td>" in reserve
    charge = row(panel, "step", "charge_payment")
    assert '<span class="status status-running">running</span>' in charge
    assert f'<td class="mono wrap-any">{command_id}</td>' in charge
    assert "payment · charge" in charge
    shipment = row(panel, "step", "create_shipment")
    assert '<span class="status status-pending">pending</span>' in shipment
    assert "<td>0</td>" in shipment


def test_the_panel_shows_tcc_state_compensations_and_the_end(viewer) -> None:
    # given a tcc saga whose second step fails for good: the prepared seat is cancelled
    sagas.SCRIPT["forward:charge_card"] = ["fatal"]
    saga_start(saga_type="test-tcc", saga_id="tcc-1")
    Worker().drain()
    panel = section(html_of(viewer, "/sagas/tcc-1"), "orch-title")
    assert '<span class="status status-compensated">compensated</span></dd>' in panel
    assert "<dt>Next run</dt><dd>none: finished</dd>" in panel
    seat = row(panel, "step", "hold_seat")
    assert '<span class="kind kind-tcc">tcc</span>' in seat
    assert "<td>rolled_back</td>" in seat
    assert '<span class="status status-compensated">compensated</span>' in seat
    card = row(panel, "step", "charge_card")
    assert '<span class="status status-failed">failed</span>' in card
    assert "Refused: charge_card: refused" in card


def test_the_live_refresh_of_the_body_keeps_the_panel(viewer) -> None:
    saga_start(saga_type="test-order", saga_id="order-50")
    Worker().drain()
    body = html_of(viewer, "/sagas/order-50", {"HX-Request": "true"})
    assert body.lstrip().startswith('<div id="saga-body"')
    assert '<a class="orchestrated" href="#orch-title"' in body
    panel = section(body, "orch-title")
    assert '<span class="status status-completed">completed</span>' in panel


def test_a_step_a_finished_run_never_reached_shows_not_run(viewer) -> None:
    # given an order saga whose second step fails for good: the later steps never run
    sagas.SCRIPT[f"forward:{sagas.ORDER_STEPS[1]}"] = ["fatal"]
    saga_start(saga_type="test-order", saga_id="nr-1")
    Worker().drain()
    panel = section(html_of(viewer, "/sagas/nr-1"), "orch-title")
    last = row(panel, "step", sagas.ORDER_STEPS[-1])
    assert "not run" in last and "status-pending" not in last
    # while a run goes on, a step it has not reached yet is pending
    saga_start(saga_type="test-order", saga_id="nr-2")
    panel = section(html_of(viewer, "/sagas/nr-2"), "orch-title")
    assert "status-pending" in row(panel, "step", sagas.ORDER_STEPS[-1])
