"""GET /metrics: Prometheus text, ingest counters from both front doors, database gauges,
protection by network and token, multiprocess mode."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.test import Client
from django.utils import timezone
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.models import SagaRun
from outbox.api import publish
from outbox.models import OutboxMessage, Status
from tests.conftest import database_away
from tracking import metrics
from tracking.api.fastpath import IngestEndpoint
from tracking.keys import service_key_create
from tracking.models import Incident, Saga, Service

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    metrics.cache_clear()


def scrape(client: Client | None = None, **headers: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics by (name, labels); asserts the page parses."""
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# --- the page -----------------------------------------------------------------------
@pytest.mark.django_db
def test_the_page_parses_and_names_every_metric() -> None:
    response = Client().get("/metrics")
    assert response.status_code == 200
    families = {f.name: f.type for f in text_string_to_metric_families(response.content.decode())}
    expected = {
        "sagaadmin_ingest_events": "counter",
        "sagaadmin_ingest_events_rejected": "counter",
        "sagaadmin_ingest_requests_refused": "counter",
        "sagaadmin_ingest_request_duration_seconds": "histogram",
        "sagaadmin_database_up": "gauge",
        "sagaadmin_newest_event_received_timestamp_seconds": "gauge",
        "sagaadmin_read_model_lag_seconds": "gauge",
        "sagaadmin_outbox_pending_messages": "gauge",
        "sagaadmin_outbox_oldest_pending_age_seconds": "gauge",
        "sagaadmin_outbox_dead_messages": "gauge",
        "sagaadmin_incidents_open": "gauge",
        "sagaadmin_orchestrator_runs": "gauge",
        "sagaadmin_step_duration_seconds": "histogram",
        "sagaadmin_step_failed_attempts": "gauge",
    }
    for name, kind in expected.items():
        assert families.get(name) == kind, name
    samples = scrape()
    assert value(samples, "sagaadmin_database_up") == 1
    # known label values are there from the start, at zero
    assert ("sagaadmin_ingest_events_total", frozenset({("result", "rejected")})) in samples
    assert ("sagaadmin_orchestrator_runs", frozenset({("status", "compensated")})) in samples
    labels = frozenset({("kind", "in_doubt"), ("status", "acknowledged")})
    assert ("sagaadmin_incidents_open", labels) in samples


@pytest.mark.django_db
def test_openmetrics_when_asked_for() -> None:
    response = Client().get("/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    types = {f.name: f.type for f in openmetrics_families(response.content.decode())}
    assert types["sagaadmin_step_duration_seconds"] == "gaugehistogram"
    assert types["sagaadmin_ingest_events"] == "counter"


@pytest.mark.django_db
def test_gzip_when_accepted() -> None:
    import gzip

    response = Client().get("/metrics", HTTP_ACCEPT_ENCODING="gzip")
    assert response["Content-Encoding"] == "gzip"
    assert b"sagaadmin_database_up" in gzip.decompress(response.content)


# --- ingest counters ----------------------------------------------------------------
@pytest.mark.django_db
def test_ingested_events_are_counted_by_result(api, make_event) -> None:
    before = scrape()
    first = make_event("saga.started", saga_id="m-1")
    answer = api.batch([first, make_event(saga_id="m-1"), make_event(saga_id="m-1")])
    assert answer.status_code == 200
    assert api.batch([first]).status_code == 200  # the same event again: a duplicate
    after = scrape()
    assert delta(before, after, "sagaadmin_ingest_events_total", result="accepted") == 3
    assert delta(before, after, "sagaadmin_ingest_events_total", result="duplicate") == 1
    assert delta(before, after, "sagaadmin_ingest_events_total", result="rejected") == 0
    assert delta(before, after, "sagaadmin_ingest_request_duration_seconds_count") == 2
    assert delta(before, after, "sagaadmin_ingest_request_duration_seconds_sum") > 0
    assert delta(before, after, "sagaadmin_ingest_request_duration_seconds_bucket", le="+Inf") == 2


@pytest.mark.django_db
def test_rejected_events_are_counted_by_field(api, make_event) -> None:
    before = scrape()
    batch = [
        make_event(saga_id="m-2"),
        make_event(saga_id="m-2", type="step.exploded"),  # not a type
        make_event(saga_id="m-2", id=None),  # no id
        make_event(saga_id="m-2", id=""),  # an empty id
        make_event(saga_id="m-2", message={"name": "x"}),  # message.id and .version missing
        make_event(saga_id="m-2", colour="blue"),  # a field the protocol does not have
    ]
    answer = api.batch(batch)
    assert answer.status_code == 200
    assert answer.json()["rejected"] == 5
    assert api.post(make_event(type="nope")).status_code == 422  # one event: 422, still counted
    after = scrape()
    assert delta(before, after, "sagaadmin_ingest_events_total", result="accepted") == 1
    assert delta(before, after, "sagaadmin_ingest_events_total", result="rejected") == 6
    assert delta(before, after, "sagaadmin_ingest_events_rejected_total", field="type") == 2
    assert delta(before, after, "sagaadmin_ingest_events_rejected_total", field="id") == 2
    assert delta(before, after, "sagaadmin_ingest_events_rejected_total", field="message") == 1
    assert delta(before, after, "sagaadmin_ingest_events_rejected_total", field="other") == 1
    assert ("sagaadmin_ingest_events_rejected_total", frozenset({("field", "colour")})) not in after


@pytest.mark.django_db
def test_refused_requests_are_counted_by_status(api, make_event) -> None:
    before = scrape()
    assert Client().post("/api/v1/events", {}, content_type="application/json").status_code == 401
    assert api.post(make_event(), CONTENT_TYPE="text/plain").status_code == 415
    assert api.post(None, raw=b"{not json").status_code == 400
    assert api.batch([]).status_code == 400
    after = scrape()
    assert delta(before, after, "sagaadmin_ingest_requests_refused_total", status="401") == 1
    assert delta(before, after, "sagaadmin_ingest_requests_refused_total", status="415") == 1
    assert delta(before, after, "sagaadmin_ingest_requests_refused_total", status="400") == 2
    for result in metrics.RESULTS:
        assert delta(before, after, "sagaadmin_ingest_events_total", result=result) == 0
    assert delta(before, after, "sagaadmin_ingest_request_duration_seconds_count") == 0


def test_rejected_field_labels_are_bounded() -> None:
    assert metrics.rejected_field("type") == "type"
    assert metrics.rejected_field("message.id") == "message"
    assert metrics.rejected_field("attributes[...].x") == "attributes"
    assert metrics.rejected_field("event") == "event"
    assert metrics.rejected_field("anything-a-reporter-sends") == "other"


@pytest.mark.django_db(transaction=True)
def test_the_fast_path_counts_the_same(make_event) -> None:
    key = service_key_create(service_name="payment").secret
    endpoint = IngestEndpoint()

    async def post(body: Any, secret: str | None) -> int:
        headers = [(b"content-type", b"application/json")]
        if secret:
            headers.append((b"authorization", f"Bearer {secret}".encode()))
        scope = {"type": "http", "method": "POST", "path": "/api/v1/events", "headers": headers}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": json.dumps(body).encode()}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await endpoint(scope, receive, send)
        return int(sent[0]["status"])

    async def main() -> list[int]:
        batches = [
            {"events": [make_event(saga_id=f"fp-{n}"), make_event(saga_id=f"fp-{n}", type="x")]}
            for n in range(5)
        ]
        posts = [post(b, key) for b in batches]
        return await asyncio.gather(*posts, post(batches[0], None))

    try:
        before = scrape()
        assert asyncio.run(main()) == [200] * 5 + [401]
        after = scrape()
    finally:
        endpoint.batcher.close()
    assert delta(before, after, "sagaadmin_ingest_events_total", result="accepted") == 5
    assert delta(before, after, "sagaadmin_ingest_events_total", result="rejected") == 5
    assert delta(before, after, "sagaadmin_ingest_events_rejected_total", field="type") == 5
    assert delta(before, after, "sagaadmin_ingest_requests_refused_total", status="401") == 1
    assert delta(before, after, "sagaadmin_ingest_request_duration_seconds_count") == 5


# --- database gauges ----------------------------------------------------------------
@pytest.mark.django_db
def test_outbox_backlog_and_dead_messages() -> None:
    samples = scrape()
    assert value(samples, "sagaadmin_outbox_pending_messages") == 0
    assert value(samples, "sagaadmin_outbox_oldest_pending_age_seconds") == 0
    assert value(samples, "sagaadmin_outbox_dead_messages") == 0
    with transaction.atomic():
        for n in range(3):
            publish(topic="orders", key=f"o-{n}", type="order.created", payload={"n": n})
    OutboxMessage.objects.filter(aggregateid="o-0").update(
        created_at=timezone.now() - timedelta(minutes=10)
    )
    OutboxMessage.objects.filter(aggregateid="o-2").update(status=Status.DEAD)
    with transaction.atomic():
        publish(topic="orders", key="o-9", type="order.created", payload={})
    OutboxMessage.objects.filter(aggregateid="o-9").update(status=Status.PUBLISHED)
    samples = scrape()
    assert value(samples, "sagaadmin_outbox_pending_messages") == 2
    assert value(samples, "sagaadmin_outbox_dead_messages") == 1
    assert 600 <= value(samples, "sagaadmin_outbox_oldest_pending_age_seconds") < 700


@pytest.mark.django_db
def test_open_incidents_by_kind_and_status() -> None:
    now = timezone.now()
    saga = Saga.objects.create(saga_id="inc-1", saga_type="order")
    other = Saga.objects.create(saga_id="inc-2", saga_type="order")
    Incident.objects.create(saga=saga, kind="stuck", reason="silent", opened_at=now)
    Incident.objects.create(
        saga=other, kind="stuck", reason="silent", opened_at=now, status="acknowledged"
    )
    Incident.objects.create(saga=saga, kind="in_doubt", reason="prepared", opened_at=now)
    Incident.objects.create(
        saga=other, kind="anomaly", reason="x", opened_at=now, status="resolved", resolved_at=now
    )
    samples = scrape()
    assert value(samples, "sagaadmin_incidents_open", kind="stuck", status="open") == 1
    assert value(samples, "sagaadmin_incidents_open", kind="stuck", status="acknowledged") == 1
    assert value(samples, "sagaadmin_incidents_open", kind="in_doubt", status="open") == 1
    assert value(samples, "sagaadmin_incidents_open", kind="anomaly", status="open") == 0
    labels = frozenset({("kind", "anomaly"), ("status", "open")})
    assert ("sagaadmin_incidents_open", labels) in samples


@pytest.mark.django_db
def test_orchestrator_runs_by_status() -> None:
    for n, status in enumerate(["running", "running", "compensating", "completed", "failed"]):
        SagaRun.objects.create(saga_id=f"run-{n}", saga_type="order", status=status)
    samples = scrape()
    assert value(samples, "sagaadmin_orchestrator_runs", status="running") == 2
    assert value(samples, "sagaadmin_orchestrator_runs", status="compensating") == 1
    assert value(samples, "sagaadmin_orchestrator_runs", status="completed") == 1
    assert value(samples, "sagaadmin_orchestrator_runs", status="failed") == 1
    assert value(samples, "sagaadmin_orchestrator_runs", status="terminated") == 0
    # in-flight runs are counted on every scrape; finished ones are cached a minute
    SagaRun.objects.filter(saga_id="run-0").update(status="completed")
    samples = scrape()
    assert value(samples, "sagaadmin_orchestrator_runs", status="running") == 1
    assert value(samples, "sagaadmin_orchestrator_runs", status="completed") == 1
    metrics.cache_clear()
    assert value(scrape(), "sagaadmin_orchestrator_runs", status="completed") == 2


@pytest.mark.django_db
def test_read_model_lag() -> None:
    samples = scrape()
    assert ("sagaadmin_read_model_lag_seconds", frozenset()) not in samples
    received = timezone.now() - timedelta(seconds=90)
    Service.objects.create(name="payment", last_event_at=received)
    Service.objects.create(name="shipping", last_event_at=received - timedelta(hours=1))
    samples = scrape()
    assert 90 <= value(samples, "sagaadmin_read_model_lag_seconds") < 120
    stamp = value(samples, "sagaadmin_newest_event_received_timestamp_seconds")
    assert stamp == pytest.approx(received.timestamp())


@pytest.mark.django_db
def test_step_durations_from_the_rollups(api, make_event) -> None:
    now = timezone.now().replace(microsecond=0)

    def at(seconds: float) -> str:
        return (now - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    events = []
    # four attempts of "charge": 0.2 s, 0.2 s, 3 s (succeeded) and 40 s (failed)
    for n, (took, outcome) in enumerate(
        [(0.2, "succeeded"), (0.2, "succeeded"), (3, "succeeded"), (40, "failed")]
    ):
        saga = f"dur-{n}"
        events += [
            make_event("saga.started", saga_id=saga, occurred_at=at(100)),
            make_event("step.started", saga_id=saga, occurred_at=at(60)),
            make_event(
                f"step.{outcome}",
                saga_id=saga,
                occurred_at=at(60 - took),
                **({"error": {"message": "declined"}} if outcome == "failed" else {}),
            ),
        ]
    answer = api.batch(events)
    assert answer.json()["accepted"] == len(events), answer.json()
    samples = scrape()
    labels = {"saga_type": "order", "step": "charge"}
    name = "sagaadmin_step_duration_seconds_bucket"
    assert value(samples, name, le="0.1", **labels) == 0
    assert value(samples, name, le="0.25", **labels) == 2
    assert value(samples, name, le="2.5", **labels) == 2
    assert value(samples, name, le="5.0", **labels) == 3
    assert value(samples, name, le="30.0", **labels) == 3
    assert value(samples, name, le="60.0", **labels) == 4
    assert value(samples, name, le="+Inf", **labels) == 4
    assert value(samples, "sagaadmin_step_duration_seconds_gcount", **labels) == 4
    # the sum is estimated from the bins' midpoints (quarter octaves: within ~10 %)
    gsum = value(samples, "sagaadmin_step_duration_seconds_gsum", **labels)
    assert gsum == pytest.approx(0.2 + 0.2 + 3 + 40, rel=0.12)
    assert value(samples, "sagaadmin_step_failed_attempts", **labels) == 1


def test_step_buckets_put_a_bin_under_its_upper_edge() -> None:
    from collections import Counter

    from tracking.rollups import bin_upper_ms, duration_bin

    bins = Counter({duration_bin(990): 1, duration_bin(1): 2})
    buckets, _ = metrics.step_buckets(bins)
    as_dict = dict(buckets)
    assert bin_upper_ms(duration_bin(990)) > 1000  # the bin of 990 ms reaches past 1 s ...
    assert as_dict["1.0"] == 2  # ... so it is not counted under le=1 (le stays an upper bound)
    assert as_dict["2.5"] == 3
    assert as_dict["+Inf"] == 3
    assert [le for le, _ in buckets][-1] == "+Inf"


@pytest.mark.django_db(transaction=True)
def test_database_away_keeps_the_page(postgres) -> None:
    assert value(scrape(), "sagaadmin_database_up") == 1
    with database_away():
        samples = scrape()
    assert value(samples, "sagaadmin_database_up") == 0
    assert ("sagaadmin_outbox_pending_messages", frozenset()) not in samples
    assert ("sagaadmin_ingest_events_total", frozenset({("result", "accepted")})) in samples


# --- protection ---------------------------------------------------------------------
def _with(settings: Any, **values: Any) -> None:
    settings.SAGAADMIN = {**settings.SAGAADMIN, **values}


@pytest.mark.django_db
def test_other_networks_are_refused(settings) -> None:
    _with(settings, METRICS_ALLOW=["10.0.0.0/8"], METRICS_TOKEN="")
    response = Client().get("/metrics")  # from 127.0.0.1
    assert response.status_code == 403
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 403
    assert body["type"].endswith("/forbidden")
    assert b"sagaadmin_" not in response.content
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="::ffff:10.1.2.3").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="11.1.2.3").get("/metrics").status_code == 403


@pytest.mark.django_db
def test_the_default_allows_loopback_only(settings) -> None:
    _with(settings, METRICS_ALLOW=["127.0.0.1/32", "::1/128"], METRICS_TOKEN="")
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="::1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="192.168.1.5").get("/metrics").status_code == 403
    assert Client(REMOTE_ADDR="").get("/metrics").status_code == 403


@pytest.mark.django_db
def test_the_token_opens_the_page_from_anywhere(settings) -> None:
    _with(settings, METRICS_ALLOW=[], METRICS_TOKEN="s3cret-scrape")
    outside = Client(REMOTE_ADDR="203.0.113.7")
    assert outside.get("/metrics").status_code == 403
    assert outside.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert outside.get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-scrape").status_code == 403
    scrape(outside, HTTP_AUTHORIZATION="Bearer s3cret-scrape")  # 200 and parses
    # localhost is not special once the allow list is empty
    assert Client().get("/metrics").status_code == 403


@pytest.mark.django_db
def test_allowed_networks_need_no_token_when_one_is_set(settings) -> None:
    _with(settings, METRICS_ALLOW=["127.0.0.1/32"], METRICS_TOKEN="s3cret-scrape")
    assert Client().get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="198.51.100.1").get("/metrics").status_code == 403


@pytest.mark.django_db
def test_only_get(settings) -> None:
    response = Client().post("/metrics")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response["Content-Type"] == "application/problem+json"


@pytest.mark.django_db
def test_a_bad_network_in_the_setting_is_a_configuration_error(settings) -> None:
    from django.core.exceptions import ImproperlyConfigured

    _with(settings, METRICS_ALLOW=["10.0.0.0/33"])
    with pytest.raises(ImproperlyConfigured, match="SAGAADMIN_METRICS_ALLOW"):
        Client(raise_request_exception=True).get("/metrics")


# --- multiprocess mode --------------------------------------------------------------
WORKER = """
import django
django.setup()
from tracking import metrics
from tracking.api.ingest import Reply
from tracking.ingest import EventResult, IngestResult
from tracking.protocol import FieldError

result = IngestResult([
    EventResult(0, "a", "accepted"),
    EventResult(1, "b", "rejected", (FieldError("type", "bad"),)),
])
for _ in range({n}):
    metrics.ingest_observed(Reply(200, b"", result=result), 0.02)
metrics.ingest_observed(Reply(401, b""), 0.001)
"""


@pytest.mark.django_db
def test_multiprocess_mode_sums_every_worker(tmp_path, monkeypatch) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    env.setdefault("DJANGO_SETTINGS_MODULE", "sagaadmin.settings.test")
    for n in (2, 3):  # two "workers", one after the other (each its own file)
        subprocess.run(
            [sys.executable, "-c", WORKER.format(n=n)], env=env, cwd=ROOT, check=True, timeout=60
        )
    assert len(list(tmp_path.glob("*.db"))) >= 2
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    samples = scrape()
    assert value(samples, "sagaadmin_ingest_events_total", result="accepted") == 5
    assert value(samples, "sagaadmin_ingest_events_rejected_total", field="type") == 5
    assert value(samples, "sagaadmin_ingest_requests_refused_total", status="401") == 2
    assert value(samples, "sagaadmin_ingest_request_duration_seconds_count") == 5
    assert value(samples, "sagaadmin_database_up") == 1  # and the database metrics still come
