"""Operator actions on the dashboard: the saga page's buttons and dialogs, the audit page.

The sagas are the orchestrator's test sagas run by a real worker: "test-slow-retry" whose
charge_payment failed once waits a minute for its retry, which the "Retry step" button
brings forward.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs

import pytest
from django.test import Client

from orchestrator.engine import saga_start
from orchestrator.models import SagaRun
from orchestrator.worker import Worker
from tracking import audit, views
from tracking.models import AuditEntry, OperatorAction, Saga

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("test_sagas")]

RoleClient = Callable[[str | None], Client]


class Buttons(HTMLParser):
    """The action bar's buttons (``data-action``) and the dialogs' ids and ``data-open``."""

    def __init__(self) -> None:
        super().__init__()
        self.buttons: dict[str, dict[str, str | None]] = {}
        self.dialogs: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "button" and found.get("data-action"):
            self.buttons[str(found["data-action"])] = found
        if tag == "dialog":
            self.dialogs[str(found["id"])] = found


def parse(html: str) -> Buttons:
    parser = Buttons()
    parser.feed(html)
    return parser


def enabled(html: str) -> set[str]:
    return {n for n, b in parse(html).buttons.items() if b.get("aria-disabled") != "true"}


def waiting_saga(test_sagas: Any, saga_id: str = "orc-1") -> Saga:
    """An orchestrated saga whose charge_payment failed: it waits 60 s for its retry."""
    test_sagas.SCRIPT["forward:charge_payment"] = ["fail"]
    saga_start(saga_type="test-slow-retry", saga_id=saga_id, data={"order_id": 7})
    Worker().drain()
    saga = Saga.objects.get(saga_id=saga_id)
    assert saga.status == "running"
    assert SagaRun.objects.get(saga_id=saga_id).next_run_at is not None
    return saga


def post_action(
    client: Client, saga: Saga, action: str, *, follow: bool = False, **fields: Any
) -> Any:
    form = {
        "reason": "the card provider is back",
        "expected_version": saga.version,
        "request_id": f"req-{action}-{saga.saga_id}",
        **fields,
    }
    return client.post(f"/actions/{action}/{saga.saga_id}", form, follow=follow)


# -- the buttons -----------------------------------------------------------------


def test_an_operator_may_retry_a_waiting_saga_and_sees_why_not_the_rest(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)

    html = role_client("operator").get(f"/sagas/{saga.saga_id}").content.decode()

    page = parse(html)
    assert set(page.buttons) == {
        "retry_step",
        "retry_compensation",
        "compensate",
        "skip_step",
        "cancel",
        "terminate",
        "pause",
        "resume",
        "rerun",
        "restart",
    }
    assert {"retry_step", "compensate", "skip_step", "cancel", "pause"} <= enabled(html)
    assert "terminate" not in enabled(html)  # admins only
    restart = page.buttons["restart"]
    assert restart["aria-disabled"] == "true"
    assert restart["title"] == "only a finished saga is restarted"
    assert re.search(r'id="why-restart"[^>]*>only a finished saga is restarted<', html)
    assert page.buttons["terminate"]["title"] == "your role may not terminate"
    # a dialog per enabled action, posting the version shown, the step prefilled
    assert "dlg-retry_step" in page.dialogs and "dlg-restart" not in page.dialogs
    assert 'action="/actions/retry_step/orc-1"' in html
    assert f'name="expected_version" value="{saga.version}"' in html
    assert re.search(r'id="dlg-retry_step-step" name="step" value="charge_payment"', html)


def test_request_ids_are_fresh_on_every_render(test_sagas: Any, role_client: RoleClient) -> None:
    saga = waiting_saga(test_sagas)
    client = role_client("operator")

    first, second = (client.get(f"/sagas/{saga.saga_id}").content.decode() for _ in range(2))

    pattern = r'name="request_id" value="([0-9a-f]{32})"'
    ids_first, ids_second = re.findall(pattern, first), re.findall(pattern, second)
    assert len(ids_first) == len(set(ids_first)) == len(enabled(first))
    assert not set(ids_first) & set(ids_second)


def test_a_finished_saga_offers_restart_only(test_sagas: Any, role_client: RoleClient) -> None:
    saga_start(saga_type="test-order", saga_id="done-1")
    Worker().drain()

    html = role_client("admin").get("/sagas/done-1").content.decode()

    assert enabled(html) == {"restart"}
    buttons = parse(html).buttons
    assert buttons["cancel"]["title"] == (
        "cannot cancel a saga that is completed (allowed: running)"
    )
    assert buttons["resume"]["title"] == "the saga is not paused"


def test_a_viewer_sees_no_enabled_button_and_no_dialog(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)

    html = role_client("viewer").get(f"/sagas/{saga.saga_id}").content.decode()

    page = parse(html)
    assert len(page.buttons) == 10 and enabled(html) == set()
    assert page.dialogs == {}
    assert page.buttons["retry_step"]["title"] == "your role may not retry step"
    assert "Operators and admins act on sagas" in html


# -- running one from the page -----------------------------------------------------


def test_the_dialog_runs_the_action_and_the_page_shows_it(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)
    client = role_client("operator")

    response = post_action(client, saga, "retry_step", step="charge_payment")

    assert response.status_code == 302 and response["Location"] == "/sagas/orc-1"
    record = OperatorAction.objects.get()
    assert (record.action, record.step, record.status, record.orchestrated) == (
        "retry_step",
        "charge_payment",
        "done",
        True,
    )
    [entry] = AuditEntry.objects.all()
    assert (entry.action, entry.outcome, entry.reason, entry.role) == (
        "retry_step",
        "done",
        "the card provider is back",
        "operator",
    )
    assert entry.actor == record.actor and entry.actor.startswith("user-operator-")
    page = client.get("/sagas/orc-1").content.decode()
    assert "Retry step on orc-1: done by the orchestrator." in page
    assert re.search(r'data-action-id="\d+" data-status="done"', page)
    assert "the card provider is back" in page
    assert 'class="audit-marks"' in page and 'data-outcome="done"' in page
    assert 'href="/audit/?saga_id=orc-1"' in page

    # and the worker retries now (not in a minute): the saga completes
    Worker().drain()
    assert Saga.objects.get(saga_id="orc-1").status == "completed"


def test_a_double_submit_returns_the_first_answer(test_sagas: Any, role_client: RoleClient) -> None:
    saga = waiting_saga(test_sagas)
    client = role_client("operator")

    post_action(client, saga, "retry_step")
    again = post_action(client, saga, "retry_step", follow=True)

    assert again.status_code == 200
    assert "already submitted: this is the first answer" in again.content.decode()
    assert OperatorAction.objects.count() == 1 and AuditEntry.objects.count() == 1


def test_a_stale_version_shows_the_conflict_in_the_open_dialog(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)
    client = role_client("operator")
    seen = saga.version
    post_action(client, saga, "pause", request_id="someone-else")  # another operator acts

    response = post_action(client, saga, "retry_step", expected_version=seen)

    assert response.status_code == 409
    html = response.content.decode()
    assert "the saga changed since you looked" in html
    assert re.search(r'id="action-refused"[^>]*>Retry step was refused: <strong>version', html)
    dialog = parse(html).dialogs["dlg-retry_step"]
    assert "data-open" in dialog  # open at load, the reason kept, the new version in the form
    assert ">the card provider is back</textarea>" in html
    assert f'name="expected_version" value="{seen + 1}"' in html
    assert 'hx-get="/sagas/orc-1"' in html  # the live refresh reads the saga page, not the POST
    assert AuditEntry.objects.filter(outcome="conflict", action="retry_step").count() == 1
    assert SagaRun.objects.get(saga_id="orc-1").next_run_at is not None  # nothing retried


def test_a_missing_reason_is_a_400_at_the_reason_field(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)

    response = post_action(role_client("operator"), saga, "retry_step", reason="   ")

    assert response.status_code == 400
    html = response.content.decode()
    assert re.search(
        r'id="dlg-retry_step-reason"[^>]*aria-invalid="true"'
        r' aria-describedby="dlg-retry_step-reason-error"',
        html,
    )
    assert re.search(r'id="dlg-retry_step-reason-error">say why \(a reason is required\)<', html)
    assert OperatorAction.objects.count() == 0


def test_rerun_data_that_is_not_json_is_a_400_at_the_data_field(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)

    response = post_action(role_client("admin"), saga, "rerun", data='{"order_id": 7,}')

    assert response.status_code == 400
    html = response.content.decode()
    assert re.search(r'id="dlg-rerun-data-error">not valid JSON', html)
    assert "{&quot;order_id&quot;: 7,}</textarea>" in html  # what was typed stays
    assert OperatorAction.objects.count() == 0


def test_an_operator_reruns_with_the_data_unchanged(
    test_sagas: Any, role_client: RoleClient
) -> None:
    """The textarea shows the saga's data to admins only; unchanged data is no edit."""
    saga = waiting_saga(test_sagas)
    client = role_client("operator")
    assert 'name="data"' not in client.get("/sagas/orc-1").content.decode()

    response = post_action(client, saga, "rerun", step="create_order", data='{"order_id": 7}')

    assert response.status_code == 302
    assert OperatorAction.objects.get().data is None


def test_a_viewer_post_is_refused_with_403_and_audited(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)

    response = post_action(role_client("viewer"), saga, "retry_step")

    assert response.status_code == 403
    assert "your role may not retry step" in response.content.decode()
    [entry] = AuditEntry.objects.all()
    assert (entry.action, entry.outcome, entry.role) == ("retry_step", "forbidden", "viewer")
    assert OperatorAction.objects.get().status == "refused"
    assert SagaRun.objects.get(saga_id="orc-1").next_run_at is not None


def test_a_user_without_a_role_cannot_post(test_sagas: Any, role_client: RoleClient) -> None:
    saga = waiting_saga(test_sagas)

    assert post_action(role_client(None), saga, "retry_step").status_code == 403
    assert AuditEntry.objects.count() == 0


# -- the audit page ------------------------------------------------------------------

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


@pytest.fixture
def entries() -> list[AuditEntry]:
    """Five entries a minute apart, the newest last."""
    rows = [
        ("ana", "operator", "retry_step", "s-1", "done", "provider back"),
        ("ben", "viewer", "retry_step", "s-1", "forbidden", "curious"),
        ("ana", "operator", "cancel", "s-2", "done", '=HYPERLINK("x")'),
        ("cy", "admin", "terminate", "s-3", "conflict", "stale page"),
        ("ana", "operator", "pause", "s-2", "done", 'looking, "quoted"\nnew line'),
    ]
    return [
        AuditEntry.objects.create(
            at=T0 + timedelta(minutes=n),
            actor=actor,
            role=role,
            action=action,
            saga_id=saga_id,
            outcome=outcome,
            reason=reason,
            state_before={"status": "running", "version": n},
            state_after={"status": "running", "version": n + 1},
        )
        for n, (actor, role, action, saga_id, outcome, reason) in enumerate(rows)
    ]


def shown(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-entry-id="(\d+)"', html)]


def test_the_audit_page_lists_entries_newest_first(
    entries: list[AuditEntry], user_client: Client
) -> None:
    response = user_client.get("/audit/")

    assert response.status_code == 200
    html = response.content.decode()
    assert shown(html) == [e.pk for e in reversed(entries)]
    assert re.search(r'<a href="/audit/" aria-current="page">Audit</a>', html)
    assert 'href="?format=csv"' in html and 'href="?format=jsonl"' in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("actor=ana", [4, 2, 0]),
        ("action=retry_step", [1, 0]),
        ("saga_id=s-2", [4, 2]),
        ("outcome=done", [4, 2, 0]),
        ("actor=ana&saga_id=s-2&outcome=done&action=cancel", [2]),
        ("actor=nobody", []),
    ],
)
def test_the_audit_page_filters_in_the_url(
    entries: list[AuditEntry], user_client: Client, query: str, expected: list[int]
) -> None:
    html = user_client.get(f"/audit/?{query}").content.decode()

    assert shown(html) == [entries[i].pk for i in expected]
    [export] = re.findall(r'href="\?([^"]*)" download>CSV<', html)
    assert parse_qs(export.replace("&amp;", "&")) == {**parse_qs(query), "format": ["csv"]}


def test_the_audit_page_pages_by_keyset(
    entries: list[AuditEntry], user_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "AUDIT_PAGE", 2)

    first = user_client.get("/audit/?outcome=done").content.decode()
    [next_query] = re.findall(r'href="\?([^"]+)" rel="next"', first)
    # an entry written meanwhile does not shift the next page
    AuditEntry.objects.create(
        at=T0 + timedelta(hours=1), actor="dee", action="pause", saga_id="s-9", outcome="done"
    )
    second = user_client.get(f"/audit/?{next_query.replace('&amp;', '&')}").content.decode()

    assert shown(first) == [entries[4].pk, entries[2].pk]
    assert "outcome=done" in next_query
    assert shown(second) == [entries[0].pk]
    assert 'rel="next"' not in second


def test_a_bad_cursor_is_a_400(entries: list[AuditEntry], user_client: Client) -> None:
    response = user_client.get("/audit/?cursor=yesterday")

    assert response.status_code == 400
    assert "not a cursor this API handed out" in response.content.decode()


def test_the_csv_export_has_everything_matching_the_filter(
    entries: list[AuditEntry], user_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "EXPORT_BATCH", 2)  # several batches
    monkeypatch.setattr(views, "AUDIT_PAGE", 1)  # the export is not the page

    response = user_client.get("/audit/?actor=ana&format=csv")

    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert re.fullmatch(
        r'attachment; filename="sagaadmin-audit-\d{8}T\d{6}Z\.csv"', response["Content-Disposition"]
    )
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [int(r["id"]) for r in rows] == [entries[i].pk for i in (4, 2, 0)]
    assert rows[0]["reason"] == 'looking, "quoted"\nnew line'
    assert rows[1]["reason"] == '\'=HYPERLINK("x")'  # a formula stays text in a spreadsheet
    assert json.loads(rows[2]["state_after"]) == {"status": "running", "version": 1}
    assert rows[2]["at"] == T0.isoformat().replace("+00:00", "Z")


def test_the_jsonl_export_has_one_entry_a_line(
    entries: list[AuditEntry], user_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "EXPORT_BATCH", 2)

    response = user_client.get("/audit/?format=jsonl")

    assert response["Content-Type"] == "application/jsonl; charset=utf-8"
    assert response["Content-Disposition"].endswith('.jsonl"')
    lines = b"".join(response.streaming_content).decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [e.pk for e in reversed(entries)]
    assert records[2]["reason"] == '=HYPERLINK("x")'  # exact here
    assert records[4]["state_before"] == {"status": "running", "version": 0}


def test_the_audit_page_shows_the_pages_own_actions(
    test_sagas: Any, role_client: RoleClient
) -> None:
    saga = waiting_saga(test_sagas)
    post_action(role_client("viewer"), saga, "retry_step")
    post_action(role_client("operator"), saga, "retry_step", request_id="r2")

    html = role_client("viewer").get("/audit/?saga_id=orc-1").content.decode()

    assert re.findall(r'data-outcome="(\w+)"', html) == ["done", "forbidden"]
    assert 'href="/sagas/orc-1"' in html
