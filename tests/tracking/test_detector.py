"""The detector pass against the database: incidents open, keep, resolve; watch_at; alerts; one
active detector. Time is passed in (``now=``, ingest's ``received_at``), never slept."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction

from outbox.models import OutboxMessage
from tracking.detector import LOCK_KEY, detect_pass
from tracking.incidents import incident_acknowledge, incident_resolve
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import Incident, Saga, SagaType
from tracking.policy import policy_invalidate, saga_type_update

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
STUCK = timedelta(seconds=900)  # settings default
_n = itertools.count()


@pytest.fixture(autouse=True)
def _fresh_policy() -> Any:
    policy_invalidate()
    yield
    policy_invalidate()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def report(saga_id: str, *events: dict[str, Any], received: float, service: str = "order") -> None:
    """Ingest events (protocol fields; ``at`` = seconds after T0) received at ``received``."""
    raws = []
    for e in events:
        body = {"id": f"ev-{next(_n)}", "saga_id": saga_id, **e}
        body["occurred_at"] = at(body.pop("at", received)).isoformat()
        raws.append(json.dumps(body).encode())
    with transaction.atomic():
        result = events_ingest(
            service=service_get_or_create(name=service), raws=raws, received_at=at(received)
        )
    assert [r.status for r in result.results] == ["accepted"] * len(raws), result.results


def start(saga_id: str, *, received: float = 0, saga_type: str = "order") -> None:
    report(
        saga_id,
        {"type": "saga.started", "saga_type": saga_type},
        {"type": "step.started", "step": "charge"},
        received=received,
    )


def saga(saga_id: str) -> Saga:
    return Saga.objects.get(saga_id=saga_id)


def messages(type_: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in OutboxMessage.objects.filter(type=type_).order_by("seq")]


# -- the stuck lifecycle ---------------------------------------------------------


@pytest.mark.django_db
def test_a_silent_saga_is_flagged_once_past_its_threshold_and_not_before() -> None:
    start("s-1")
    assert saga("s-1").watch_at == at(0) + STUCK  # projection: when it could become stuck

    early = detect_pass(now=at(600))
    assert (early.examined, early.opened) == (0, 0)  # not due: not even read

    result = detect_pass(now=at(901))
    assert (result.examined, result.opened) == (1, 1)
    incident = Incident.objects.get()
    assert (incident.kind, incident.status, incident.step) == ("stuck", "open", "charge")
    assert incident.reason == "no event for 15 min (threshold 15 min)"
    row = saga("s-1")
    assert row.open_incidents == ",stuck,"
    assert row.watch_at is None  # nothing more can fire by waiting; only new events matter
    # the evidence is the saga's last event, as stored
    last = incident.evidence[-1]
    assert last["type"] == "step.started" and last["step"] == "charge"
    [alert] = messages("sagaadmin.incident.opened")
    assert (alert["kind"], alert["saga_id"], alert["incident_id"]) == ("stuck", "s-1", incident.pk)
    assert alert["evidence"] == [last["event_id"]]

    again = detect_pass(now=at(2000))
    assert (again.examined, again.opened) == (0, 0)
    assert Incident.objects.count() == 1


@pytest.mark.django_db
def test_it_resolves_by_itself_when_the_saga_reports_again() -> None:
    start("s-1")
    detect_pass(now=at(901))
    report("s-1", {"type": "step.succeeded", "step": "charge"}, received=1000)
    assert saga("s-1").watch_at == at(1000)  # an open incident: due at once

    result = detect_pass(now=at(1001))
    assert (result.examined, result.resolved) == (1, 1)
    incident = Incident.objects.get()
    assert (incident.status, incident.resolution, incident.resolved_by) == (
        "resolved",
        "auto",
        "detector",
    )
    assert "moved on" in incident.resolution_note
    assert saga("s-1").open_incidents == ""
    assert saga("s-1").watch_at == at(1000) + STUCK  # silence counts again from here
    assert [m["incident_id"] for m in messages("sagaadmin.incident.resolved")] == [incident.pk]


@pytest.mark.django_db
def test_settled_sagas_are_never_read() -> None:
    report(
        "done",
        {"type": "saga.started", "saga_type": "order"},
        {"type": "step.started", "step": "charge"},
        {"type": "step.succeeded", "step": "charge"},
        {"type": "saga.completed"},
        received=0,
    )
    assert saga("done").watch_at is None
    assert detect_pass(now=at(10**6)).examined == 0


@pytest.mark.django_db
def test_an_operator_resolution_holds_until_there_is_new_evidence() -> None:
    start("s-1")
    detect_pass(now=at(901))
    first = Incident.objects.get()
    incident_acknowledge(incident_id=first.pk, user="olivia", note="looking")
    incident_resolve(incident_id=first.pk, user="olivia", note="vendor is slow, fine")
    assert saga("s-1").open_incidents == ""
    # the same silence (same last event) does not reopen it
    Saga.objects.filter(saga_id="s-1").update(watch_at=at(1000))
    assert detect_pass(now=at(1001)).opened == 0
    # progress, then silence again: new evidence, a new incident
    report("s-1", {"type": "heartbeat"}, received=1100)
    assert detect_pass(now=at(1100 + 901)).opened == 1
    assert Incident.objects.filter(resolved_at__isnull=True).get().pk != first.pk
    assert [m["event"] for m in messages("sagaadmin.incident.acknowledged")] == ["acknowledged"]
    assert [m["note"] for m in messages("sagaadmin.incident.resolved")] == ["vendor is slow, fine"]


@pytest.mark.django_db
def test_a_failed_compensation_opens_on_the_next_pass_with_its_events_as_evidence() -> None:
    start("s-2")
    report(
        "s-2",
        {
            "type": "step.failed",
            "step": "charge",
            "error": {"type": "Declined", "retryable": False},
        },
        {"type": "compensation.started", "step": "charge", "at": 11},
        {"type": "compensation.failed", "step": "charge", "at": 12, "error": {"type": "Timeout"}},
        received=12,
    )
    assert saga("s-2").watch_at == at(12)  # due at once: no waiting involved
    result = detect_pass(now=at(13))
    assert result.opened == 1
    incident = Incident.objects.get()
    assert incident.kind == "compensation_failed"
    stored = {(e["event_id"], e["type"]) for e in incident.evidence}
    from tracking.models import TelemetryEvent

    expected = set(
        TelemetryEvent.objects.filter(saga_id="s-2", type="compensation.failed").values_list(
            "event_id", "type"
        )
    )
    assert stored == expected and len(expected) == 1
    # retried successfully later: resolved automatically
    report(
        "s-2",
        {"type": "compensation.started", "step": "charge", "attempt": 2},
        {"type": "compensation.succeeded", "step": "charge", "attempt": 2},
        {"type": "saga.compensated"},
        received=100,
    )
    assert detect_pass(now=at(101)).resolved == 1
    assert saga("s-2").watch_at is None


@pytest.mark.django_db
def test_in_doubt_and_never_started_are_found_by_waiting() -> None:
    start("s-3")
    report("s-3", {"type": "tx.prepared", "step": "charge"}, received=5, service="bank")
    assert saga("s-3").watch_at == at(5) + timedelta(seconds=300)
    report("orphan", {"type": "step.started", "step": "ship"}, received=0, service="shipping")
    assert detect_pass(now=at(306)).opened == 1
    assert Incident.objects.get().kind == "in_doubt"
    result = detect_pass(now=at(905 + 1))  # both silences past 15 min now
    kinds = sorted(Incident.objects.values_list("saga__saga_id", "kind"))
    assert kinds == [
        ("orphan", "anomaly"),
        ("orphan", "stuck"),
        ("s-3", "in_doubt"),
        ("s-3", "stuck"),
    ]
    assert result.opened == 3
    assert sorted(saga("s-3").incident_list) == ["in_doubt", "stuck"]


# -- thresholds -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_saga_type_is_created_on_first_sight_and_its_threshold_applies() -> None:
    start("s-4", saga_type="refund")
    assert SagaType.objects.filter(name="refund").exists()
    assert detect_pass(now=at(120)).opened == 0
    saga_type_update(name="refund", changes={"stuck_after_seconds": 60}, user="ada")
    assert saga("s-4").watch_at is not None and saga("s-4").watch_at > at(0)  # marked due
    result = detect_pass(now=saga("s-4").watch_at)
    assert result.opened == 1
    assert "threshold 60 s" in Incident.objects.get().reason


# -- alerts -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_flood_of_alerts_folds_into_one_summary(settings: Any) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, "ALERT_BURST": 2, "ALERT_WINDOW_SECONDS": 60}
    for i in range(5):
        start(f"flood-{i}")
    assert detect_pass(now=at(901)).opened == 5
    assert len(messages("sagaadmin.incident.opened")) == 2
    assert messages("sagaadmin.incident.summary") == []
    result = detect_pass(now=at(901 + 61))  # the window ended: its summary goes out
    assert result.summaries == 1
    [summary] = messages("sagaadmin.incident.summary")
    assert (summary["saga_type"], summary["kind"], summary["sent"]) == ("order", "stuck", 2)
    assert summary["suppressed"] == {"opened": 3}
    assert detect_pass(now=at(901 + 200)).summaries == 0  # nothing more to say


# -- one active detector ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_only_one_detector_runs_a_pass_at_a_time(postgres: None) -> None:
    start("s-5")
    dsn = connection.get_connection_params()
    other = psycopg.connect(
        host=dsn.get("host"),
        port=dsn.get("port"),
        user=dsn.get("user"),
        dbname=connection.settings_dict["NAME"],
        autocommit=True,
    )
    try:
        other.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])  # another worker's pass
        skipped = detect_pass(now=at(901))
        assert not skipped.ran and Incident.objects.count() == 0
        other.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])
    finally:
        other.close()
    assert detect_pass(now=at(901)).opened == 1


@pytest.mark.django_db(transaction=True)
def test_two_workers_side_by_side_open_each_incident_once(postgres: None) -> None:
    for i in range(40):
        start(f"pair-{i}")
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def worker() -> None:
        from django.db import connections

        try:
            barrier.wait()
            for _ in range(5):
                results.append(detect_pass(now=at(901), batch_size=5))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Incident.objects.count() == 40
    assert sum(r.opened for r in results) == 40
    assert sum(r.examined for r in results) == 40


@pytest.mark.django_db(transaction=True)
def test_a_saga_locked_by_ingest_is_skipped_and_stays_due(postgres: None) -> None:
    start("busy")
    start("free")
    dsn = connection.get_connection_params()
    other = psycopg.connect(
        host=dsn.get("host"),
        port=dsn.get("port"),
        user=dsn.get("user"),
        dbname=connection.settings_dict["NAME"],
    )
    try:
        other.execute("SELECT 1 FROM tracking_saga WHERE saga_id = 'busy' FOR UPDATE")
        result = detect_pass(now=at(901))
        assert (result.examined, result.skipped, result.opened) == (1, 1, 1)
    finally:
        other.rollback()
        other.close()
    assert saga("busy").watch_at == at(0) + STUCK  # still due
    assert detect_pass(now=at(902)).opened == 1


@pytest.mark.django_db
def test_manage_py_detect_once_prints_the_pass(capsys: Any) -> None:
    from django.core.management import call_command

    start("cmd-1", received=-10_000)  # silent for hours by the real clock
    report("cmd-1", {"type": "heartbeat"}, received=-9_000)
    Saga.objects.filter(saga_id="cmd-1").update(watch_at=at(-8_000))
    call_command("detect", "--once")
    out = capsys.readouterr().out
    assert out.startswith("detector: examined 1 sagas in ")
    assert "opened 1, resolved 0 incidents" in out


@pytest.mark.django_db
def test_an_operators_incident_changes_are_audited() -> None:
    from tracking.models import AuditEntry

    start("aud-1")
    detect_pass(now=at(901))
    incident = Incident.objects.get()
    incident_acknowledge(incident_id=incident.pk, user="olivia", note="on it")
    incident_resolve(incident_id=incident.pk, user="olivia", note="restarted the consumer")
    entries = list(
        AuditEntry.objects.order_by("pk").values_list("action", "actor", "reason", "saga_id")
    )
    assert entries == [
        ("acknowledge_incident", "olivia", "on it", "aud-1"),
        ("resolve_incident", "olivia", "restarted the consumer", "aud-1"),
    ]
