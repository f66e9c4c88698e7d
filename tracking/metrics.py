"""Prometheus metrics at ``GET /metrics`` (docs/metrics.md).

Two sources, one page:

- **per request**, counted by the web process that answered it: events
  ingested and rejected, whole requests refused, ingest latency. Both front
  doors of ``POST /api/v1/events`` (the Django view and the ASGI fast path)
  call :func:`ingest_observed` once per request: a few counter increments,
  no I/O.
- **from the database**, read when Prometheus scrapes
  (:class:`DatabaseCollector`): read-model freshness, outbox backlog and dead
  messages, unresolved incidents, orchestrator runs, learned step durations.
  A handful of aggregate queries, each served by an index or a small table;
  the two that are not (finished runs, step histograms) are cached for
  :data:`SLOW_CACHE_SECONDS` per process.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several uvicorn workers), the
per-request metrics are kept in files in that directory and summed over every
worker at scrape time, whichever worker answers the scrape.

Access: clients in ``SAGAADMIN["METRICS_ALLOW"]`` (CIDRs), or anyone with
``Authorization: Bearer <SAGAADMIN["METRICS_TOKEN"]>``; others get 403.
"""

from __future__ import annotations

import bisect
import gzip
import hmac
import ipaddress
import logging
import os
import threading
import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError
from django.db.models import Count, Max, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from orchestrator.models import TERMINAL_RUN_STATUSES, RunStatus, SagaRun
from outbox.models import OutboxMessage
from outbox.models import Status as OutboxStatus
from sagaadmin.problems import problem_response
from tracking.api.auth import bearer_token
from tracking.models import (
    Incident,
    IncidentKind,
    IncidentStatus,
    Service,
    StepStat,
    StepStatDay,
    StepStatDelta,
)
from tracking.protocol import EventV1
from tracking.rollups import STEP_BUCKET, STEP_BUCKET_COARSE, bin_upper_ms, floor_time

if TYPE_CHECKING:
    from tracking.api.ingest import Reply

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SLOW_CACHE_SECONDS = 60.0

# --- per request (the web process) -------------------------------------------------
RESULTS = ("accepted", "duplicate", "rejected")
# Whole-request refusals of POST /api/v1/events (tracking/api/ingest.py).
REFUSED_STATUSES = (400, 401, 405, 413, 415, 500, 503)
# The ``field`` label: the top-level protocol field an error names ("message.id" ->
# "message"), "event" for an event that is not a JSON object, else "other" (e.g. a
# field the protocol does not have), so a reporter cannot add label values.
FIELDS = frozenset(EventV1.__struct_fields__) | {"event"}

EVENTS = Counter(
    "sagaadmin_ingest_events",
    "Events in POST /api/v1/events requests that were processed, by result.",
    ["result"],
)
EVENTS_REJECTED = Counter(
    "sagaadmin_ingest_events_rejected",
    "Rejected events by the top-level field their error names.",
    ["field"],
)
REQUESTS_REFUSED = Counter(
    "sagaadmin_ingest_requests_refused",
    "POST /api/v1/events requests refused as a whole (no event processed), by HTTP status.",
    ["status"],
)
INGEST_SECONDS = Histogram(
    "sagaadmin_ingest_request_duration_seconds",
    "Time to answer a POST /api/v1/events request whose events were processed.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
_EVENTS = {result: EVENTS.labels(result=result) for result in RESULTS}
_REFUSED = {status: REQUESTS_REFUSED.labels(status=str(status)) for status in REFUSED_STATUSES}


def ingest_observed(reply: Reply, seconds: float) -> None:
    """Count one answered ``POST /api/v1/events`` or OTLP export (cheap: counters only)."""
    result = reply.result
    if result is None:
        child = _REFUSED.get(reply.status)
        if child is None:
            child = _REFUSED[reply.status] = REQUESTS_REFUSED.labels(status=str(reply.status))
        child.inc()
        return
    tally: Tally[str] = Tally()
    for event in result.results:
        tally[event.status] += 1
        if event.errors:
            EVENTS_REJECTED.labels(field=rejected_field(event.errors[0].field)).inc()
    for status, n in tally.items():
        (_EVENTS.get(status) or EVENTS.labels(result=status)).inc(n)
    INGEST_SECONDS.observe(seconds)


def rejected_field(field: str) -> str:
    top = field.split(".", 1)[0].split("[", 1)[0]
    return top if top in FIELDS else "other"


# --- from the database (at scrape time) -------------------------------------------
# Boundaries of the step-duration histogram, seconds.
STEP_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
UNRESOLVED = (IncidentStatus.OPEN, IncidentStatus.ACKNOWLEDGED)
IN_FLIGHT = (RunStatus.RUNNING, RunStatus.COMPENSATING)

_cache: dict[str, tuple[float, Any]] = {}
_cache_lock = threading.Lock()


def _cached[T](key: str, compute: Callable[[], T]) -> T:
    """``compute()``, kept for :data:`SLOW_CACHE_SECONDS` in this process."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < SLOW_CACHE_SECONDS:
            return hit[1]  # type: ignore[no-any-return]
    value = compute()
    with _cache_lock:
        _cache[key] = (now, value)
    return value


def cache_clear() -> None:
    with _cache_lock:
        _cache.clear()


class DatabaseCollector(Collector):
    """The metrics read from the database, queried on every scrape."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "sagaadmin_database_up",
            "1 when this scrape's database queries answered; 0: the database metrics are missing.",
        )
        try:
            now = timezone.now()
            families = [
                *_read_model(now),
                *_outbox(now),
                _incidents(),
                _runs(),
                *_steps(now),
            ]
        except DatabaseError as exc:
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def _read_model(now: datetime) -> list[Metric]:
    # The overview's "newest event received" (one row per service; ingest touches it
    # after commit, at most once a second per process).
    newest = Service.objects.aggregate(newest=Max("last_event_at"))["newest"]
    stamp = GaugeMetricFamily(
        "sagaadmin_newest_event_received_timestamp_seconds",
        "Unix time the newest stored event was received (absent before the first event).",
    )
    lag = GaugeMetricFamily(
        "sagaadmin_read_model_lag_seconds",
        "Seconds since the newest stored event was received (absent before the first event).",
    )
    if newest is not None:
        stamp.add_metric([], newest.timestamp())
        lag.add_metric([], max((now - newest).total_seconds(), 0.0))
    return [stamp, lag]


def _outbox(now: datetime) -> list[Metric]:
    counts = OutboxMessage.objects.filter(
        status__in=[OutboxStatus.PENDING, OutboxStatus.DEAD]
    ).aggregate(
        pending=Count("pk", filter=Q(status=OutboxStatus.PENDING)),
        dead=Count("pk", filter=Q(status=OutboxStatus.DEAD)),
    )
    # the relay publishes in sequence order: the lowest pending seq is the oldest
    oldest = (
        OutboxMessage.objects.filter(status=OutboxStatus.PENDING)
        .order_by("seq")
        .values_list("created_at", flat=True)
        .first()
    )
    age = max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
    return [
        GaugeMetricFamily(
            "sagaadmin_outbox_pending_messages",
            "Outbox messages not published yet (the relay's backlog).",
            value=counts["pending"],
        ),
        GaugeMetricFamily(
            "sagaadmin_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending outbox message (0 when none is pending).",
            value=age,
        ),
        GaugeMetricFamily(
            "sagaadmin_outbox_dead_messages",
            "Outbox messages that ran out of attempts and wait for an operator.",
            value=counts["dead"],
        ),
    ]


def _incidents() -> Metric:
    rows = (
        Incident.objects.filter(status__in=UNRESOLVED)
        .order_by()
        .values_list("kind", "status")
        .annotate(n=Count("pk"))
    )
    counts = {(kind, status): n for kind, status, n in rows}
    family = GaugeMetricFamily(
        "sagaadmin_incidents_open",
        "Incidents not resolved yet, by kind and status (open or acknowledged).",
        labels=["kind", "status"],
    )
    kinds = [*IncidentKind.values, *sorted({k for k, _ in counts} - set(IncidentKind.values))]
    for kind in kinds:
        for status in UNRESOLVED:
            family.add_metric([kind, status], counts.get((kind, status), 0))
    return family


def _runs() -> Metric:
    # Runs in flight: the partial index of running/compensating runs. Finished runs
    # are never deleted, so counting them reads the table: cached.
    counts: dict[str, int] = {s: 0 for s in RunStatus.values}
    in_flight = (
        SagaRun.objects.filter(status__in=IN_FLIGHT)
        .order_by()
        .values_list("status")
        .annotate(n=Count("pk"))
    )
    counts.update(dict(in_flight))
    counts.update(_cached("runs_finished", _runs_finished))
    family = GaugeMetricFamily(
        "sagaadmin_orchestrator_runs",
        "Orchestrator runs (SagaRun) by status; finished statuses are up to a minute old.",
        labels=["status"],
    )
    for status, n in counts.items():
        family.add_metric([status], n)
    return family


def _runs_finished() -> dict[str, int]:
    rows = (
        SagaRun.objects.filter(status__in=TERMINAL_RUN_STATUSES)
        .order_by()
        .values_list("status")
        .annotate(n=Count("pk"))
    )
    return dict(rows)


def _steps(now: datetime) -> list[Metric]:
    bins, failures = _cached("steps", lambda: learned_bins(now=now))
    histogram = GaugeHistogramMetricFamily(
        "sagaadmin_step_duration_seconds",
        "Learned durations of finished forward step attempts in the last SAGAADMIN_LEARN_DAYS "
        "days, by saga type and step (from the step-duration rollups).",
        labels=["saga_type", "step"],
    )
    failed = GaugeMetricFamily(
        "sagaadmin_step_failed_attempts",
        "Finished forward step attempts in the last SAGAADMIN_LEARN_DAYS days that did not "
        "succeed, by saga type and step.",
        labels=["saga_type", "step"],
    )
    for (saga_type, step), histogram_bins in sorted(bins.items()):
        buckets, total_seconds = step_buckets(histogram_bins)
        histogram.add_metric([saga_type, step], buckets, total_seconds)
        failed.add_metric([saga_type, step], failures.get((saga_type, step), 0))
    return [histogram, failed]


StepKey = tuple[str, str]


def learned_bins(*, now: datetime) -> tuple[dict[StepKey, Tally[int]], dict[StepKey, int]]:
    """Per (saga type, step): the duration-bin histogram and failures of the learning window.

    The window and sources of ``tracking.policy.learned_durations``: hourly rows for
    the first partial day, daily rows after it, and the deltas not compacted yet.
    """
    since = floor_time(now - timedelta(days=settings.SAGAADMIN["LEARN_DAYS"]), STEP_BUCKET)
    edge = floor_time(since, STEP_BUCKET_COARSE) + STEP_BUCKET_COARSE
    sources = [
        StepStat.objects.filter(bucket__gte=since, bucket__lt=edge),
        StepStatDay.objects.filter(bucket__gte=edge),
        StepStatDelta.objects.filter(bucket__gte=since),
    ]
    bins: dict[StepKey, Tally[int]] = defaultdict(Tally)
    failures: Tally[StepKey] = Tally()
    for qs in sources:
        rows = (
            qs.order_by()
            .values_list("saga_type", "step", "bin")
            .annotate(n=Sum("count"), f=Sum("failures"))
        )
        for saga_type, step, bin_, n, f in rows:
            bins[(saga_type, step)][bin_] += n
            failures[(saga_type, step)] += f
    kept = {key: +histogram for key, histogram in bins.items() if sum(histogram.values()) > 0}
    return kept, {key: max(failures[key], 0) for key in kept}


def step_buckets(bins: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` pairs (ending with ``+Inf``) and the estimated sum, seconds.

    A duration bin (a quarter octave, tracking/rollups.py) counts under the first
    boundary at or above its upper edge, so ``le`` is a true upper bound; the sum
    takes each bin's midpoint.
    """
    per_bucket = [0] * (len(STEP_BUCKETS) + 1)
    total_seconds = 0.0
    for bin_, n in bins.items():
        if n <= 0:
            continue
        upper = bin_upper_ms(bin_) / 1000
        lower = (2 ** (bin_ / 4) - 1) / 1000
        total_seconds += n * (lower + upper) / 2
        per_bucket[bisect.bisect_left(STEP_BUCKETS, upper)] += n
    out, running = [], 0
    for le, n in zip((*STEP_BUCKETS, float("inf")), per_bucket, strict=True):
        running += n
        out.append((floatToGoString(le), float(running)))
    return out, total_seconds


# --- the page -----------------------------------------------------------------------
class _ThisProcess(Collector):
    """The default registry's metrics (this process's counters, process and GC stats)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def scrape_registry() -> CollectorRegistry:
    """What one scrape exposes: the per-request metrics (every worker's, in
    multiprocess mode) and the database collector."""
    registry = CollectorRegistry(auto_describe=False)
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        MultiProcessCollector(registry, path=path)
    else:
        registry.register(_ThisProcess())
    registry.register(DatabaseCollector())
    return registry


def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: the Prometheus text format (OpenMetrics when asked for)."""
    if not access_allowed(request):
        return problem_response(
            403,
            "forbidden",
            "Metrics are served to the networks in SAGAADMIN_METRICS_ALLOW, or with "
            "'Authorization: Bearer <SAGAADMIN_METRICS_TOKEN>'.",
        )
    if request.method not in ("GET", "HEAD"):
        return problem_response(
            405, "method-not-allowed", "Use GET to read metrics.", headers={"Allow": "GET, HEAD"}
        )
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(scrape_registry())
    response = HttpResponse(content_type=content_type)
    response["Vary"] = "Accept, Accept-Encoding"
    response["Cache-Control"] = "no-store"
    if gzip_accepted(request.headers.get("Accept-Encoding", "")):
        body = gzip.compress(body)
        response["Content-Encoding"] = "gzip"
    response.content = body
    return response


def access_allowed(request: HttpRequest) -> bool:
    """A client address in ``METRICS_ALLOW``, or the ``METRICS_TOKEN`` as bearer token."""
    cfg = settings.SAGAADMIN
    token = cfg["METRICS_TOKEN"]
    if token:
        given = bearer_token(request)
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            return True
    return address_allowed(request.META.get("REMOTE_ADDR", ""), tuple(cfg["METRICS_ALLOW"]))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    out = []
    for cidr in cidrs:
        if not cidr.strip():
            continue
        try:
            out.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ImproperlyConfigured(f"SAGAADMIN_METRICS_ALLOW: {exc}") from exc
    return tuple(out)


def address_allowed(address: str, cidrs: tuple[str, ...]) -> bool:
    allowed = networks(cidrs)  # first: a bad setting fails every request, not only some
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # no address (a Unix socket): only the token opens the page
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in allowed)
