"""Spans/s through the OTLP/HTTP receiver against events/s through POST /api/v1/events, one run.

What it measures, against one server started as production runs it (uvicorn,
N worker processes, no access log; bench/ingest.py's ``server_running``) on a
fresh database (``sagaadmin_benchotlp``, recreated on every run and dropped at
the end unless ``--keep-db``) of the local PostgreSQL server:

* OTLP: spans/s accepted by ``POST /v1/traces`` with protobuf
  (``application/x-protobuf``) ``ExportTraceServiceRequest`` bodies of 512
  spans: 128 sagas of one saga span (``sagaadmin.saga.id``,
  ``sagaadmin.saga.type``, ``sagaadmin.saga.root``) and three step spans
  (``sagaadmin.saga.id``, ``sagaadmin.saga.type``, ``sagaadmin.step.name``,
  ``sagaadmin.step.attempt``), unique 16-byte trace ids and 8-byte span ids.
  Each span becomes two events (saga.started + saga.completed, step.started +
  step.succeeded), so a request stores 1,024 events;
* JSON: events/s accepted by ``POST /api/v1/events`` with ``{"events": [...]}``
  batches of 1,000 events (the endpoint's limit, ``INGEST_MAX_EVENTS``, is
  1,000; 1,000 is 125 whole sagas, the nearest to the OTLP request's 128):
  exactly the events the receiver's mapping (``tracking.otlp.spans_map``)
  makes of the same kind of spans, so both paths store the same rows and the
  difference is what each path does to get there.

Each saga is the eight events of bench/ingest.py's workload (saga.started,
started/succeeded for the steps order, payment and stock, saga.completed, 40 ms
apart); the sagas of a phase start within 2 s around the middle of its window
(wall clock), so none looks clock-skewed. Both paths get the same server,
database, number of client processes (``--concurrency``, one keep-alive
connection each) and warm-up (``--warmup`` s before each window), every
request body encoded before the clock starts; bench/ingest.py's clients and
measurement count the work completed inside a fixed window, every response
must be 200 with nothing rejected (OTLP: no ``partial_success``). Phases
alternate JSON, OTLP, OTLP, JSON, ... (``--reps`` each) so slow drift (the
tables grow) cancels out, each after a CHECKPOINT; a phase during which other
programs used over 0.25 cores runs again (``--retries`` times, default 1); the
ratio uses the medians.

Before the timed phases one request of each kind is checked: its sagas read
back from the database are completed, with the eight expected events, three
succeeded steps, no flags and the trace id. After them every saga in the
database must be completed with eight events and no flags.

Bar (issue 9): spans/s through OTLP >= 0.5 x events/s through /api/v1/events.
``--profile`` adds a cProfile of the OTLP view (and, for comparison, the JSON
view) on one 512-span request through Django's test client, in this process.

Usage: .venv/bin/python bench/otlp.py [--quick] [--seconds S] [--concurrency N]
[--workers N] [--reps N] [--retries N] [--keep-db] [--profile]. The base DSN comes from
BENCH_PG (default postgresql://postgres@127.0.0.1:5432). Exits 0 whether or
not the bar passes (it is a measurement), 1 on errors.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import http.client
import io
import json
import math
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ingest
import psycopg
from common import ROOT, BenchError, base_dsn, manage
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from psycopg import sql

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tracking.otlp import spans_map  # the receiver's mapping (imports no Django)

DB_NAME = "sagaadmin_benchotlp"
OTLP_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
OTLP_SERVICE = "bench-otlp"  # the JSON side reports as bench/ingest.py's service "bench"
SAGA_TYPE, STEPS = ingest.SAGA_TYPE, ingest.STEPS
SPANS_PER_SAGA = 1 + len(STEPS)
EVENTS_PER_SPAN = 2
EVENTS_PER_SAGA = EVENTS_PER_SPAN * SPANS_PER_SAGA  # 8, as in bench/ingest.py
SPANS_PER_REQUEST = 512
JSON_BATCH = 1000  # events per JSON request: INGEST_MAX_EVENTS, 125 whole sagas
GAP_NS = 40_000_000  # between a saga's consecutive events, as in bench/ingest.py
BAR = 0.5
# A phase expects the median rate of the earlier phases of its kind (the first: a
# third of MAX_RATE); its clients pre-generate bodies for 3 x that rate, at most
# MAX_RATE. Clients that run out early are measured up to that moment (and say so).
MAX_RATE = {"batch": ingest.MAX_BATCH_EVENTS_PER_S, "otlp": ingest.MAX_BATCH_EVENTS_PER_S // 2}
PER_REQUEST = {"batch": JSON_BATCH, "otlp": SPANS_PER_REQUEST}
DISTURBED_CORES = 0.25  # other programs' CPU during a phase that makes it run again
SPREAD_S = 2.0  # the sagas of a phase start within this many seconds around its middle
EVENTS_PER_ITEM = {"batch": 1, "otlp": EVENTS_PER_SPAN}
LABELS = {
    "batch": f"/api/v1/events JSON ({JSON_BATCH:,} ev/req)",
    "otlp": f"OTLP {OTLP_PATH} pb ({SPANS_PER_REQUEST} spans/req)",
}
ingest.UNITS.setdefault("otlp", "spans/s")  # ingest.result_row's unit for OTLP phases


# --- workload ------------------------------------------------------------------------


def export_requests(
    requests: int, spans_per_request: int, span_start: float, span_seconds: float
) -> Iterator[ExportTraceServiceRequest]:
    """``requests`` export requests of whole sagas whose start times spread over the span."""
    sagas_per_request = spans_per_request // SPANS_PER_SAGA
    total = requests * sagas_per_request
    for r in range(requests):
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        attr = resource_spans.resource.attributes.add()
        attr.key, attr.value.string_value = "service.name", OTLP_SERVICE
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = "bench/otlp.py"
        for i in range(r * sagas_per_request, (r + 1) * sagas_per_request):
            started = int(1e9 * (span_start + span_seconds * i / total))
            saga_spans(scope_spans.spans, started)
        yield request


def saga_spans(spans: Any, started_ns: int) -> None:
    """Append one successful saga's spans: the saga's own, then one per step."""
    saga_id, trace, root = f"order-{uuid.uuid4().hex}", os.urandom(16), os.urandom(8)
    common = (("sagaadmin.saga.id", saga_id), ("sagaadmin.saga.type", SAGA_TYPE))
    last = 2 * len(STEPS) + 1
    span = spans.add(trace_id=trace, span_id=root, name=SAGA_TYPE, kind=Span.SPAN_KIND_SERVER)
    span.start_time_unix_nano, span.end_time_unix_nano = started_ns, started_ns + last * GAP_NS
    for key, value in common:
        span.attributes.add(key=key).value.string_value = value
    span.attributes.add(key="sagaadmin.saga.root").value.bool_value = True
    for n, step in enumerate(STEPS):
        span = spans.add(trace_id=trace, span_id=os.urandom(8), parent_span_id=root, name=step)
        span.kind = Span.SPAN_KIND_INTERNAL
        span.start_time_unix_nano = started_ns + (2 * n + 1) * GAP_NS
        span.end_time_unix_nano = started_ns + (2 * n + 2) * GAP_NS
        for key, value in (*common, ("sagaadmin.step.name", step)):
            span.attributes.add(key=key).value.string_value = value
        span.attributes.add(key="sagaadmin.step.attempt").value.int_value = 1


def json_body(request: ExportTraceServiceRequest) -> bytes:
    """The events the receiver makes of ``request``, as one /api/v1/events batch."""
    mapped = spans_map(request)
    if len(mapped.events) != EVENTS_PER_SPAN * mapped.spans:
        raise BenchError(
            f"the receiver's mapping made {len(mapped.events)} events of {mapped.spans} spans, "
            f"not {EVENTS_PER_SPAN} each (ignored {mapped.ignored}, invalid {mapped.invalid})"
        )
    return json.dumps({"events": mapped.events}, separators=(",", ":")).encode()


def bodies_make(kind: str, requests: int, span_start: float, span_seconds: float) -> list[bytes]:
    """``requests`` OTLP protobuf or JSON batch bodies of sagas starting over the span."""
    if kind == "otlp":
        stream = export_requests(requests, SPANS_PER_REQUEST, span_start, span_seconds)
        return [r.SerializeToString() for r in stream]
    spans = JSON_BATCH // EVENTS_PER_SPAN
    return [json_body(r) for r in export_requests(requests, spans, span_start, span_seconds)]


# --- clients (run in bench/ingest.py's client processes) ------------------------------


class OtlpTask(ingest.PostTask):
    """POSTs pre-encoded export requests to the OTLP receiver over one keep-alive connection."""

    path = OTLP_PATH
    content_type = PROTOBUF

    def answer_check(self, status: int, data: bytes) -> None:
        otlp_answer_check(status, data)


def otlp_answer_check(status: int, data: bytes) -> None:
    if status != 200:
        raise BenchError(f"HTTP {status}: {data[:400]!r}")
    answer = ExportTraceServiceResponse.FromString(data)
    if answer.HasField("partial_success"):
        partial = answer.partial_success
        raise BenchError(f"{partial.rejected_spans} spans rejected: {partial.error_message[:400]}")


@dataclasses.dataclass(frozen=True)
class PathPhase(ingest.Phase):
    """A phase of JSON batches (kind "batch") or OTLP requests (kind "otlp").

    ``events_per_thread`` counts the items each client sends: events for JSON,
    spans for OTLP. The sagas' timestamps ignore ``span_start``/``span_seconds``:
    they lie within ``SPREAD_S`` around the middle of the measuring window, as
    the client expects it (its generation time estimated from one body), so
    events sent are at most about half the phase old or ahead of the clock,
    whatever rate each client gets (the server flags a saga ``clock_skew`` from
    ``CLOCK_SKEW_SECONDS``, 30 s).
    """

    def make_task(self, task_id: int, spread: ingest.ConnectionSpread | None) -> ingest.PostTask:
        requests = math.ceil(self.events_per_thread / PER_REQUEST[self.kind])
        bodies_make(self.kind, 1, time.time(), 1.0)  # warm
        began = time.monotonic()
        bodies_make(self.kind, 1, time.time(), 1.0)
        ready_at = time.time() + (time.monotonic() - began) * requests + 1.0
        middle = ready_at + self.warmup + self.duration / 2
        bodies = bodies_make(self.kind, requests, middle - SPREAD_S / 2, SPREAD_S)
        task = OtlpTask if self.kind == "otlp" else ingest.PostTask
        return task(int(self.target), self.key, bodies, PER_REQUEST[self.kind], spread)


def path_phase(
    kind: str, args: argparse.Namespace, port: int, key: str, expected: float
) -> PathPhase:
    """A phase of ``kind`` expecting ``expected`` items/s: bodies for 3 x that, at most MAX_RATE."""
    rate = min(MAX_RATE[kind], 3 * expected)
    per_client = rate * (args.warmup + args.seconds) / args.concurrency
    per_request = PER_REQUEST[kind]
    return PathPhase(
        LABELS[kind],
        kind,
        args.concurrency,
        1,
        warmup=args.warmup,
        duration=args.seconds,
        target=str(port),
        key=key,
        events_per_thread=per_request * math.ceil(per_client / per_request),
    )


# --- correctness -----------------------------------------------------------------------


def sample_check(port: int, keys: dict[str, str], dsn: str) -> dict[str, int]:
    """Send one request of each kind; check its sagas as read back from the database.

    Returns the body size of each kind's request in bytes.
    """
    now = time.time()
    otlp_request = next(export_requests(1, SPANS_PER_REQUEST, now, 1.0))
    json_request = next(export_requests(1, JSON_BATCH // EVENTS_PER_SPAN, now, 1.0))
    sizes = {}
    for kind, request, path, content_type in (
        ("otlp", otlp_request, OTLP_PATH, PROTOBUF),
        ("batch", json_request, "/api/v1/events", JSON),
    ):
        body = request.SerializeToString() if kind == "otlp" else json_body(request)
        sizes[kind] = len(body)
        conn = http.client.HTTPConnection(ingest.HOST, port, timeout=60)
        headers = {"Authorization": f"Bearer {keys[kind]}", "Content-Type": content_type}
        try:
            conn.request("POST", path, body, headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if kind == "otlp":
            otlp_answer_check(response.status, data)
        elif response.status != 200 or json.loads(data)["accepted"] != JSON_BATCH:
            raise BenchError(f"sample JSON batch: HTTP {response.status}: {data[:400]!r}")
        traces = {e["saga_id"]: e["trace_id"] for e in spans_map(request).events}
        problems = sagas_check(dsn, traces, OTLP_SERVICE if kind == "otlp" else "bench")
        if problems:
            raise BenchError(
                f"sample {LABELS[kind]}: {len(problems)} of {len(traces)} sagas wrong:\n  "
                + "\n  ".join(problems[:5])
            )
        print(f"sample {LABELS[kind]}: {len(traces)} sagas read back as expected", flush=True)
    return sizes


EXPECTED_EVENTS = Counter(
    [("saga.started", ""), ("saga.completed", "")]
    + [(f"step.{phase}", step) for step in STEPS for phase in ("started", "succeeded")]
)


def sagas_check(dsn: str, traces: dict[str, str], service: str) -> list[str]:
    """What is wrong with the sagas ``traces`` names (saga id -> trace id), as stored."""
    ids = list(traces)
    with psycopg.connect(dsn) as conn:
        sagas = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT saga_id, saga_type, status, event_count, flags, trace_ids, services "
                "FROM tracking_saga WHERE saga_id = ANY(%s)",
                (ids,),
            )
        }
        steps: dict[str, dict[str, tuple[str, int]]] = {}
        for saga_id, name, status, attempt in conn.execute(
            "SELECT s.saga_id, st.name, st.status, st.attempt FROM tracking_step st "
            "JOIN tracking_saga s ON s.id = st.saga_id WHERE s.saga_id = ANY(%s)",
            (ids,),
        ):
            steps.setdefault(saga_id, {})[name] = (status, attempt)
        events: dict[str, Counter[tuple[str, str]]] = {}
        for saga_id, type_, step, name in conn.execute(
            "SELECT e.saga_id, e.type, e.step, sv.name FROM tracking_telemetryevent e "
            "JOIN tracking_service sv ON sv.id = e.service_id WHERE e.saga_id = ANY(%s)",
            (ids,),
        ):
            events.setdefault(saga_id, Counter())[(type_, step)] += 1
            if name != service:
                events[saga_id][("reported by", name)] += 1
    problems = []
    for saga_id, trace in traces.items():
        if saga_id not in sagas:
            problems.append(f"{saga_id}: no saga row")
            continue
        saga_type, status, count, flags, trace_ids, services = sagas[saga_id]
        got = (saga_type, status, count, flags, trace_ids, services)
        want = (SAGA_TYPE, "completed", EVENTS_PER_SAGA, "", [trace], f",{service},")
        if got != want:
            problems.append(f"{saga_id}: saga row {got}, expected {want}")
        want_steps = {step: ("succeeded", 1) for step in STEPS}
        if steps.get(saga_id) != want_steps:
            problems.append(f"{saga_id}: steps {steps.get(saga_id)}, expected {want_steps}")
        if events.get(saga_id) != EXPECTED_EVENTS:
            problems.append(f"{saga_id}: events {dict(events.get(saga_id, {}))}")
    return problems


def totals_check(dsn: str) -> str:
    """Every saga stored so far is completed with its eight events; returns a summary."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT status, event_count, flags, count(*) FROM tracking_saga GROUP BY 1, 2, 3"
        ).fetchall()
        by_service: dict[str, int] = dict(
            conn.execute(
                "SELECT sv.name, count(*) FROM tracking_telemetryevent e "
                "JOIN tracking_service sv ON sv.id = e.service_id GROUP BY 1"
            ).fetchall()
        )
        row = conn.execute(
            "SELECT extract(epoch FROM min(received_at - occurred_at)), "
            "extract(epoch FROM max(received_at - occurred_at)) FROM tracking_telemetryevent"
        ).fetchone()
        ages = (float(row[0]), float(row[1])) if row and row[0] is not None else (0.0, 0.0)
    sagas = sum(r[3] for r in rows)
    wrong = [r for r in rows if r[:3] != ("completed", EVENTS_PER_SAGA, "")]
    if wrong or sum(by_service.values()) != EVENTS_PER_SAGA * sagas:
        raise BenchError(
            f"after the run: sagas by (status, event_count, flags): {rows}; events {by_service}; "
            f"events received {ages[0]:+.1f} to {ages[1]:+.1f} s after they occurred"
        )
    return (
        f"{sagas:,} sagas stored, all completed with {EVENTS_PER_SAGA} events and no flags "
        f"({by_service.get('bench', 0):,} events by JSON, "
        f"{by_service.get(OTLP_SERVICE, 0):,} by OTLP), received {ages[0]:+.1f} to "
        f"{ages[1]:+.1f} s after they occurred"
    )


# --- profile ---------------------------------------------------------------------------


def profile_views(dsn: str, keys: dict[str, str], runs: int = 3) -> str:
    """cProfile the OTLP view and the JSON view on equal work, through Django's test client."""
    os.environ.update(DATABASE_URL=dsn, DJANGO_SETTINGS_MODULE="sagaadmin.settings.base", DEBUG="0")
    import django

    django.setup()
    from django.db import connections

    try:
        return "".join(profile_view(kind, keys[kind], runs) for kind in ("otlp", "batch"))
    finally:
        connections.close_all()


def profile_view(kind: str, key: str, runs: int) -> str:
    """One warm-up and ``runs`` profiled POSTs of 128 sagas (1,024 events) each.

    JSON carries them as two batches of 512 events (a request takes at most 1,000).
    """
    from django.test import Client

    client = Client(headers={"Authorization": f"Bearer {key}"})
    path, content_type = (OTLP_PATH, PROTOBUF) if kind == "otlp" else ("/api/v1/events", JSON)
    posts = []
    for request in export_requests(runs + 1, SPANS_PER_REQUEST, time.time(), 1.0):
        if kind == "otlp":
            posts.append([request.SerializeToString()])
            continue
        events = spans_map(request).events
        half = len(events) // 2
        posts.append(
            [json.dumps({"events": part}).encode() for part in (events[:half], events[half:])]
        )
    profiler = cProfile.Profile()
    for n, bodies in enumerate(posts):
        if n:
            profiler.enable()
        for body in bodies:
            response = client.post(path, body, content_type=content_type)
            if kind == "otlp":
                otlp_answer_check(response.status_code, response.content)
            elif response.status_code != 200:
                raise BenchError(f"profile {path}: HTTP {response.status_code}")
        profiler.disable()
    out = io.StringIO()
    sagas = SPANS_PER_REQUEST // SPANS_PER_SAGA
    stats = pstats.Stats(profiler, stream=out)
    print(
        f"\n{LABELS[kind]}: cumulative ms per {sagas} sagas ({sagas * EVENTS_PER_SAGA} events)"
        f"{'' if kind == 'otlp' else ', sent as 2 x 512 events'}, mean of {runs} profiled:",
        file=out,
    )
    for name, ms in profile_buckets(stats, runs):
        print(f"  {name:<58}{ms:>8.1f}", file=out)
    print("  top functions by own time (all runs):", file=out)
    stats.sort_stats("tottime").print_stats(10)
    return out.getvalue()


PROFILE_POINTS = (  # (label, file, function): cumulative time (Python 3.12+'s cProfile
    # misreports the views' own cumulative time, so the whole request is the total)
    ("  key check (service_key_authenticate, per request)", "keys.py", "service_key_authenticate"),
    ("  protobuf decode (otlp.request_decode)", "tracking/otlp.py", "request_decode"),
    ("  mapping spans to event dicts (otlp.spans_map)", "tracking/otlp.py", "spans_map"),
    ("    of which span timestamps (otlp._time)", "tracking/otlp.py", "_time"),
    ("  JSON split (body_split)", "api/ingest.py", "body_split"),
    ("  events_ingest (the same for both paths)", "tracking/ingest.py", "events_ingest"),
    ("    validate (decode_event, content_hash, ...)", "tracking/ingest.py", "_validate"),
    ("    insert events (_insert_events_later)", "tracking/ingest.py", "_insert_events_later"),
    (
        "    fold and insert new sagas (read_model_create_later)",
        "tracking/read_model.py",
        "read_model_create_later",
    ),
    ("  commit", "django/db/backends/base/base.py", "commit"),
    ("  waiting for PostgreSQL (psycopg wait, all of the above)", "psycopg/connection.py", "wait"),
)


def profile_buckets(stats: pstats.Stats, runs: int) -> list[tuple[str, float]]:
    """The whole request and the points of interest (PROFILE_POINTS), ms per request."""
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    total: float = stats.total_tt  # type: ignore[attr-defined]
    out = [("whole request (Django handler, test client)", 1000 * total / runs)]
    for label, file_part, func in PROFILE_POINTS:
        found = [v[3] for (f, _, n), v in raw.items() if n == func and file_part in f]
        if found:
            out.append((label, 1000 * sum(found) / runs))
    return out


# --- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s phases, one of each: a smoke run")
    p.add_argument("--seconds", type=float, default=20.0, help="measured s per phase")
    p.add_argument("--warmup", type=float, default=3.0, help="s of load before each window")
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="client processes, one keep-alive connection each (both paths)",
    )
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    p.add_argument("--reps", type=int, default=3, help="phases of each path; medians compared")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help=f"times a phase runs again when other programs used over {DISTURBED_CORES} cores",
    )
    p.add_argument("--keep-db", action="store_true", help=f"do not drop {DB_NAME} at the end")
    p.add_argument("--profile", action="store_true", help="cProfile both views afterwards")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.reps, args.retries = 3.0, 1.0, 1, 0
    if args.reps < 1 or args.concurrency < 1 or args.workers < 1 or args.retries < 0:
        p.error("--reps, --concurrency and --workers must be at least 1, --retries at least 0")
    return args


def database_drop(name: str) -> None:
    with psycopg.connect(f"{base_dsn()}/postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def run_phases(
    args: argparse.Namespace, env: dict[str, str], keys: dict[str, str]
) -> tuple[list[ingest.Result], dict[str, int], str]:
    """Start the server, check a sample, measure the phases in ABBA order, check the rest."""
    dsn = env["DATABASE_URL"]
    order = (["batch", "otlp", "otlp", "batch"] * args.reps)[: 2 * args.reps]
    results: list[ingest.Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-otlp-") as tmp:
        log = Path(tmp, "uvicorn.log")
        with ingest.server_running(env, args.workers, log) as (port, pgid):
            print(f"server up on port {port} with {args.workers} workers", flush=True)
            sizes = sample_check(port, keys, dsn)
            for kind in order:
                seen = [r.rate for r in results if r.phase.kind == kind]
                expected = statistics.median(seen) if seen else MAX_RATE[kind] / 3
                phase = path_phase(kind, args, port, keys[kind], expected)
                for attempt in range(args.retries + 1):
                    result = ingest.run_server_phase(phase, dsn, pgid, log)
                    print(f"  {ingest.result_row(result)}", flush=True)
                    if result.cpu["other"] <= DISTURBED_CORES or attempt == args.retries:
                        break
                    print(f"  other programs used {result.cpu['other']:.2f} cores: again")
                results.append(result)
        ingest.server_log_check(log)
    return results, sizes, totals_check(dsn)


def report(
    results: list[ingest.Result],
    sizes: dict[str, int],
    totals: str,
    args: argparse.Namespace,
    pg_version: str,
) -> None:
    print()
    print(
        f"Saga Admin OTLP benchmark: {os.cpu_count()} cores, PostgreSQL {pg_version}, "
        f"uvicorn {args.workers} workers, {args.concurrency} client connections per path, "
        f"{args.seconds:g} s per phase after {args.warmup:g} s warm-up, {args.reps} phase(s) "
        "per path"
    )
    print(
        f"request bodies: OTLP {SPANS_PER_REQUEST} spans = {SPANS_PER_REQUEST // SPANS_PER_SAGA} "
        f"sagas = {SPANS_PER_REQUEST * EVENTS_PER_SPAN:,} events in {sizes['otlp']:,} bytes "
        f"(protobuf); JSON {JSON_BATCH:,} events = {JSON_BATCH // EVENTS_PER_SAGA} sagas in "
        f"{sizes['batch']:,} bytes; the same stored rows per saga"
    )
    print(totals)
    print()
    print(ingest.RESULT_HEADER)
    for r in results:
        print(ingest.result_row(r))
    disturbed = [n + 1 for n, r in enumerate(results) if r.cpu["other"] > DISTURBED_CORES]
    if disturbed:
        print(
            f"  warning: other programs used over {DISTURBED_CORES} cores during phase(s) "
            f"{', '.join(map(str, disturbed))}"
        )
    json_rates = [r.rate for r in results if r.phase.kind == "batch"]
    span_rates = [r.rate for r in results if r.phase.kind == "otlp"]
    events_s, spans_s = statistics.median(json_rates), statistics.median(span_rates)
    print()
    what = f"median of {args.reps}" if args.reps > 1 else "one phase"
    print(
        f"{'/api/v1/events (JSON) events/s, ' + what:<50}{events_s:>10,.0f} events/s"
        f"  (phases {', '.join(f'{x:,.0f}' for x in json_rates)})"
    )
    print(
        f"{'OTLP /v1/traces spans/s, ' + what:<50}{spans_s:>10,.0f} spans/s"
        f"   (phases {', '.join(f'{x:,.0f}' for x in span_rates)})"
    )
    print(
        f"{'  events/s those spans stored':<50}{EVENTS_PER_SPAN * spans_s:>10,.0f} events/s"
        f"  ({EVENTS_PER_SPAN} per span)"
    )
    cost = {  # server + PostgreSQL CPU ms per 1,000 stored events
        kind: statistics.mean(
            1e6 * (r.cpu["server"] + r.cpu["postgres"]) / (r.rate * EVENTS_PER_ITEM[kind])
            for r in results
            if r.phase.kind == kind
        )
        for kind in ("batch", "otlp")
    }
    print(
        f"{'server + PostgreSQL CPU per 1,000 stored events':<50}   JSON {cost['batch']:.1f} ms, "
        f"OTLP {cost['otlp']:.1f} ms"
    )
    print(
        f"{'OTLP events/s / JSON events/s':<50}{EVENTS_PER_SPAN * spans_s / events_s:>10.3f}"
        "  (for comparison)"
    )
    ratio = spans_s / events_s
    verdict = "PASS" if ratio >= BAR else "FAIL"
    print(
        f"{'BAR: OTLP spans/s / /api/v1/events events/s':<50}{ratio:>10.3f}  "
        f"(bar ≥ {BAR}, needs ≥ {BAR * events_s:,.0f} spans/s)  {verdict}"
    )


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill too
    try:
        dsn, pg_version, env, json_key = ingest.database_prepare(DB_NAME)
        otlp_key = manage(env, "create_service_key", OTLP_SERVICE, "--quiet").strip()
        keys = {"batch": json_key, "otlp": otlp_key}
        results, sizes, totals = run_phases(args, env, keys)
        report(results, sizes, totals, args, pg_version)
        if args.profile:
            print("\ncProfile through Django's test client (one process, no server):")
            print(profile_views(dsn, keys))
    finally:
        if not args.keep_db:
            database_drop(DB_NAME)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\nbench/otlp.py: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
