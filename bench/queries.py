"""Read-path latency of Saga Admin at scale, against the raw SQL it runs, in one run.

What it measures, on a fresh database (``sagaadmin_queries``, dropped and
recreated on every run) of the local PostgreSQL server, seeded with 1,000,000
sagas (``--quick``: 100,000):

* the saga list page (``GET /sagas/``): unfiltered, with each filter (type,
  status, service, step, flag, saga id prefix, a start-time range, an
  ``attr.order_id`` and an ``attr.customer`` attribute), and a keyset page
  ~200 pages deep (reached by following ``next_cursor``);
* the saga detail page (``GET /sagas/<id>``) of a saga with 200 events;
* the overview page (``GET /?window=``) for 1h, 24h and 7d;

each four ways, interleaved (one repetition of each in turn, after a warm-up):

* page: server time of the full request through Django's test client,
  in-process (middleware, session, view, template), as a logged-in superuser;
* api: the same through the JSON API where there is one (``/api/v1/sagas``,
  ``/api/v1/sagas/<id>/events``);
* selector: the product's query code alone (``saga_list``; ``saga_get`` +
  ``saga_events_list`` + ``saga_timeline_build``; ``overview_get``);
* raw: the SQL statements the page ran, captured with ``CaptureQueriesContext``
  and replayed through one psycopg connection (client-side cursor like
  Django's, JSON columns fetched as text, every row fetched);

then prints the bars: list and detail page p95 <= 50 ms, overview page p95 <=
150 ms, and every page p95 <= 3 x the p95 of its raw SQL, with the EXPLAIN
ANALYZE of the slowest statement of every case that fails a bar.

Seed: ``manage.py migrate``, then every row by COPY straight into the tables
(two processes: sagas and steps, events), the secondary indexes and
constraints dropped during the load and rebuilt after it (then checked against
the migrated schema), ``VACUUM (ANALYZE)``. Sagas start over the last 7 days in
id order, of five types with four steps each, mostly completed, with failed,
compensated, compensation_failed, cancelled, stuck running/compensating and
(the newest) running ones; attributes ``{"order_id": n, "customer": "c-<k>"}``,
flags on ~2.5 %. A step row exists for every step the saga reached (like the
projection: ~3.85 per saga), with the ``attempts`` records the projection
writes. Each saga has 8 events (its own events, the saga.* ones dropped first
or heartbeats added, to make 8), except one saga of 200 events (retries,
messages, heartbeats) whose saga and step rows are computed by the projection
itself (``tracking.projection.fold``). The rollups (``SagaCount``,
``StepStat``) are computed from the same sagas with the product's own bucket
and bin functions (their hourly/daily copies summed from them in SQL), and
checked against the tables; the delta tables stay empty
(the state right after a compaction).

Usage: .venv/bin/python bench/queries.py [--quick] [--sagas N] [--reps N] ...
(``--help`` lists every option; each also reads a BENCH_* variable). The base
DSN comes from BENCH_PG (default postgresql://postgres@127.0.0.1:5432).
Exits 0 whether or not the bars pass (it is a measurement), 1 on errors.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any
from urllib.parse import urlencode

import psycopg
from common import ROOT, BenchError, base_dsn, database_recreate, env_num, manage, server_version
from psycopg import sql
from psycopg.types.string import TextLoader

DB_NAME = "sagaadmin_queries"
SETTINGS = "sagaadmin.settings.base"
FULL_SAGAS, QUICK_SAGAS = 1_000_000, 100_000
EVENTS_PER_SAGA, DETAIL_EVENTS = 8, 200
SPAN_US = 7 * 24 * 3600 * 1_000_000
BAR_LIST_MS, BAR_DETAIL_MS, BAR_OVERVIEW_MS, BAR_RATIO = 50.0, 50.0, 150.0, 3.0
DISTURBED_CORES = 0.25  # other programs' average CPU above which the report warns
SEED = 20_260_101
CUSTOMERS = 50_000
MASK64, MASK128 = 2**64 - 1, 2**128 - 1
SEEDED_TABLES = ("tracking_saga", "tracking_step", "tracking_telemetryevent")
SERVICES = ("account", "billing", "notification", "order", "payment", "shipping", "stock")
SERVICE_ID = {name: i + 1 for i, name in enumerate(SERVICES)}
# type, saga id prefix, share of sagas, steps (name, service, median duration in ms)
SAGA_TYPES = (
    (
        "order_fulfillment",
        "ord",
        0.40,
        (("create_order", "order", 40), ("charge", "payment", 350)),
        (("reserve_stock", "stock", 120), ("ship", "shipping", 900)),
    ),
    (
        "payment_refund",
        "ref",
        0.20,
        (("validate_refund", "order", 30), ("refund", "payment", 400)),
        (("restock", "stock", 100), ("notify_customer", "notification", 60)),
    ),
    (
        "subscription_renewal",
        "sub",
        0.15,
        (("load_plan", "billing", 25), ("charge", "payment", 350)),
        (("extend_period", "billing", 50), ("notify_customer", "notification", 60)),
    ),
    (
        "shipment",
        "shp",
        0.15,
        (("create_label", "shipping", 200), ("schedule_pickup", "shipping", 300)),
        (("track_delivery", "shipping", 1500), ("notify_customer", "notification", 60)),
    ),
    (
        "account_closure",
        "acc",
        0.10,
        (("freeze_account", "account", 80), ("settle_balance", "payment", 500)),
        (("purge_data", "account", 2500), ("notify_customer", "notification", 60)),
    ),
)
TYPE_CUM = [sum(t[2] for t in SAGA_TYPES[: i + 1]) for i in range(len(SAGA_TYPES))]
STEP_DEFS = [(*t[3], *t[4]) for t in SAGA_TYPES]
# Planned outcome (before "now" cuts the newest sagas short, which leaves them running).
OUTCOMES = (
    ("completed", 0.870),
    ("failed", 0.030),
    ("compensated", 0.050),
    ("compensation_failed", 0.010),
    ("cancelled", 0.020),
    ("stuck", 0.010),  # running: a step that never reported its end
    ("stuck_compensating", 0.010),
)
OUTCOME_CUM = [sum(o[1] for o in OUTCOMES[: i + 1]) for i in range(len(OUTCOMES))]
COMPENSATING_OUTCOMES = ("compensated", "compensation_failed", "stuck_compensating")
FAILING_OUTCOMES = ("failed", *COMPENSATING_OUTCOMES)
TERMINAL = {
    "completed": "saga.completed",
    "failed": "saga.failed",
    "compensated": "saga.compensated",
    "compensation_failed": "saga.compensation_failed",
    "cancelled": "saga.cancelled",
}
# Error objects as reporters send them, already JSON (they go into COPY text as is).
ERRORS = {
    "failed": '{"type": "Rejected", "message": "refused", "retryable": false}',
    "timed_out": '{"type": "Timeout", "message": "no reply", "retryable": true}',
    "compensation": '{"type": "UndoRefused", "message": "refused", "retryable": true}',
}
# Step status from the outcome of its last forward / compensation attempt (as the projection).
STEP_STATUS = {
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "timed_out": "timed_out",
}
COMP_STATUS = {
    "running": "compensating",
    "succeeded": "compensated",
    "failed": "compensation_failed",
}
SAGA_COLUMNS = (
    "id, saga_id, saga_type, status, current_step, started_at, ended_at, last_event_at, "
    "last_received_at, duration_ms, deadline, last_error, idempotency_key, attributes, "
    "services, trace_ids, flags, anomalies, event_count, version"
)
STEP_COLUMNS = (
    "id, saga_id, name, position, service, status, attempt, started_at, ended_at, "
    "duration_ms, deadline, last_error, idempotency_key, compensation_attempt, attempts"
)
EVENT_COLUMNS = (
    "id, service_id, event_id, protocol_version, saga_id, saga_type, type, step, attempt, "
    "occurred_at, received_at, sequence, deadline, idempotency_key, message, error, "
    "attributes, payload, trace_id, span_id, content_hash"
)
PAYLOAD = '{"amount": 4990, "currency": "EUR"}'
CHUNK_SAGAS = 2_000  # sagas formatted per COPY write


# --- time and ids as text, fast ----------------------------------------------------


def _us(when: datetime) -> int:
    return (int(when.timestamp()) * 1_000_000) + when.microsecond


def _dt(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


class TimeText:
    """UTC times in integer microseconds -> COPY text and isoformat, cached per minute."""

    def __init__(self) -> None:
        self._sql: dict[int, str] = {}
        self._iso: dict[int, str] = {}

    def sql(self, us: int) -> str:
        minute, rest = divmod(us, 60_000_000)
        prefix = self._sql.get(minute)
        if prefix is None:
            prefix = self._sql[minute] = _dt(minute * 60_000_000).strftime("%Y-%m-%d %H:%M:")
        return f"{prefix}{rest // 1_000_000:02d}.{rest % 1_000_000:06d}+00"

    def iso(self, us: int) -> str:
        """As ``datetime.isoformat()`` writes it (the projection's attempt records)."""
        minute, rest = divmod(us, 60_000_000)
        prefix = self._iso.get(minute)
        if prefix is None:
            prefix = self._iso[minute] = _dt(minute * 60_000_000).strftime("%Y-%m-%dT%H:%M:")
        if rest % 1_000_000 == 0:
            return f"{prefix}{rest // 1_000_000:02d}+00:00"
        return f"{prefix}{rest // 1_000_000:02d}.{rest % 1_000_000:06d}+00:00"


def saga_hex(i: int) -> str:
    return f"{(i * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & MASK64:016x}"


def event_uuid(i: int, k: int) -> str:
    h = f"{((i * 256 + k) * 0x5851F42D4C957F2D6A09E667F3BCC909 + 0x1234567) & MASK128:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _q(value: str | None) -> str:
    """A value as COPY text (None -> NULL)."""
    if value is None:
        return "\\N"
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


# --- the workload: one saga, planned, then cut at "now" ------------------------------


@dataclasses.dataclass(slots=True)
class Sim:
    """One saga as the projection would hold it, plus the events it was built from."""

    type_index: int
    started: int
    status: str
    ended: int | None
    current_step: str
    recs: list[list[list[Any]]]  # per step: [kind, attempt, start, end, outcome, error]
    events: list[tuple[int, str, int, int]]  # (time, type, step index or -1, attempt)
    last_error: str | None
    customer: int
    anomaly: bool
    skew: bool


class Simulator:
    """Sagas 0..n-1 from one seeded random stream: every process sees the same sagas."""

    def __init__(self, n: int, now_us: int) -> None:
        self.n = n
        self.now = now_us
        self.t0 = now_us - SPAN_US
        self.spacing = SPAN_US / n
        self.rng = Random(SEED)
        self.mu = [[math.log(ms) for _, _, ms in steps] for steps in STEP_DEFS]

    def saga(self, i: int) -> Sim:
        """Saga ``i``: its whole life planned in order, then cut at now."""
        rng = self.rng
        rand = rng.random
        ti = min(bisect.bisect_right(TYPE_CUM, rand()), len(SAGA_TYPES) - 1)
        steps = STEP_DEFS[ti]
        mu = self.mu[ti]
        started = self.t0 + int((i + rand()) * self.spacing)
        outcome = OUTCOMES[min(bisect.bisect_right(OUTCOME_CUM, rand()), len(OUTCOMES) - 1)][0]
        at = 1 + int(rand() * 3)  # the step that fails / is cancelled / hangs
        roll = rand()
        customer = int(rand() * CUSTOMERS)
        recs: list[list[list[Any]]] = [[], [], [], []]
        events: list[tuple[int, str, int, int]] = [(started, "saga.started", -1, 1)]
        order: list[tuple[int, list[Any]]] = []
        t = started
        for j in range(4):
            if j > at and outcome in FAILING_OUTCOMES:
                break
            t += 2_000 + int(rand() * 30_000)
            if outcome == "cancelled" and j == at:
                break
            if outcome == "stuck" and j == at:
                rec = ["forward", 1, t, None, "running", None]
                recs[j].append(rec)
                order.append((j, rec))
                events.append((t, "step.started", j, 1))
                break
            failing = j == at and outcome in FAILING_OUTCOMES
            attempts = 1 + int(rand() * 3) if failing else 1 + (rand() < 0.04)
            for a in range(1, attempts + 1):
                d = int(rng.lognormvariate(mu[j], 0.6) * 1000)
                last = a == attempts
                if last and not failing:
                    result, error = "succeeded", None
                elif rand() < 0.2:
                    result, error = "timed_out", ERRORS["timed_out"]
                else:
                    result, error = "failed", ERRORS["failed"]
                rec = ["forward", a, t, t + d, result, error]
                recs[j].append(rec)
                order.append((j, rec))
                events.append((t, "step.started", j, a))
                events.append((t + d, f"step.{result}", j, a))
                t += d + (0 if last else 100_000 + int(rand() * 200_000))
        if outcome in COMPENSATING_OUTCOMES:
            for j in range(at - 1, -1, -1):
                t += 2_000 + int(rand() * 20_000)
                if outcome == "stuck_compensating":
                    rec = ["compensation", 1, t, None, "running", None]
                    recs[j].append(rec)
                    order.append((j, rec))
                    events.append((t, "compensation.started", j, 1))
                    break
                d = int(rng.lognormvariate(mu[j], 0.6) * 1000)
                bad = outcome == "compensation_failed" and j == at - 1
                result = "failed" if bad else "succeeded"
                rec = ["compensation", 1, t, t + d, result, ERRORS["compensation"] if bad else None]
                recs[j].append(rec)
                order.append((j, rec))
                events.append((t, "compensation.started", j, 1))
                events.append((t + d, f"compensation.{result}", j, 1))
                t += d
                if bad:
                    break
        ended: int | None = None
        status = outcome
        if outcome in TERMINAL:
            t += 1_000 + int(rand() * 5_000)
            ended = t
            events.append((t, TERMINAL[outcome], -1, 1))
        elif outcome == "stuck":
            status = "running"
        else:
            status = "compensating"
        if t > self.now:  # the newest sagas: what has not happened yet is not there
            status, ended = self._cut(recs, order, events)
        return Sim(
            type_index=ti,
            started=started,
            status=status,
            ended=ended,
            current_step=self._current_step(steps, order, status),
            recs=recs,
            events=events,
            last_error=self._last_error(steps, order),
            customer=customer,
            anomaly=roll < 0.005,
            skew=0.003 <= roll < 0.025,
        )

    def _cut(
        self,
        recs: list[list[list[Any]]],
        order: list[tuple[int, list[Any]]],
        events: list[tuple[int, str, int, int]],
    ) -> tuple[str, None]:
        now = self.now
        events[:] = [e for e in events if e[0] <= now]
        for j, rec in order:
            if rec[2] > now:
                recs[j].remove(rec)
            elif rec[3] is not None and rec[3] > now:
                rec[3], rec[4], rec[5] = None, "running", None
        order[:] = [(j, rec) for j, rec in order if rec in recs[j]]
        compensating = any(rec[0] == "compensation" for _, rec in order)
        return ("compensating" if compensating else "running"), None

    @staticmethod
    def _current_step(steps: Any, order: list[tuple[int, list[Any]]], status: str) -> str:
        if status not in ("running", "compensating") or not order:
            return ""
        j, rec = order[-1]
        if rec[0] == "forward" and rec[4] == "succeeded":
            return ""  # between two steps
        return steps[j][0]

    @staticmethod
    def _last_error(steps: Any, order: list[tuple[int, list[Any]]]) -> str | None:
        for j, rec in reversed(order):
            if rec[5] is not None:
                return f'{rec[5][:-1]}, "step": "{steps[j][0]}"}}'
        return None


def eight_events(sim: Sim) -> list[tuple[int, str, int, int]]:
    """The saga's events trimmed (saga.* first, then the oldest) or padded to 8."""
    events = list(sim.events)
    if len(events) > EVENTS_PER_SAGA and events[0][1] == "saga.started":
        events.pop(0)
    if len(events) > EVENTS_PER_SAGA and events[-1][1].startswith("saga."):
        events.pop()
    del events[: max(0, len(events) - EVENTS_PER_SAGA)]
    if len(events) < EVENTS_PER_SAGA:
        first, last = events[0][0], events[-1][0]
        step = max(e[2] for e in events)
        missing = EVENTS_PER_SAGA - len(events)
        events += [
            (first + (last - first) * (m + 1) // (missing + 1), "heartbeat", step, 1)
            for m in range(missing)
        ]
        events.sort()
    return events


def detail_saga_events(n: int, started: int) -> tuple[str, list[dict[str, Any]]]:
    """The 200-event saga: retries, messages between services, heartbeats."""
    rng = Random(SEED + 1)
    saga_id = f"ord-{saga_hex(n // 2)}"
    t = started
    out: list[dict[str, Any]] = []

    def add(service: str, kind: str, step: str = "", attempt: int = 1, **extra: Any) -> None:
        nonlocal t
        t += 1_000 + int(rng.random() * 40_000)
        out.append(
            {"service": service, "type": kind, "step": step, "attempt": attempt, "at": t, **extra}
        )

    add("order", "saga.started", saga_type="order_fulfillment")
    add("order", "step.started", "create_order")
    add("order", "step.succeeded", "create_order")
    for attempt in range(1, 27):
        add("payment", "step.started", "charge", attempt)
        last = attempt == 26
        add("payment", "step.succeeded" if last else "step.failed", "charge", attempt)
        if not last:
            t += 200_000
    for m in range(30):
        message = {"id": f"msg-{m:03d}", "name": "PaymentCaptured"}
        add("payment", "message.published", message=message)
        add("stock", "message.consumed", message=message)
    add("stock", "step.started", "reserve_stock")
    add("stock", "step.succeeded", "reserve_stock")
    add("shipping", "step.started", "ship")
    while len(out) < DETAIL_EVENTS - 2:
        add("shipping", "heartbeat", "ship")
    add("shipping", "step.succeeded", "ship")
    add("order", "saga.completed")
    sequence: Counter[str] = Counter()
    for e in out:
        e["sequence"] = sequence[e["service"]]
        sequence[e["service"]] += 1
        e["received"] = e["at"] + 1_000 + int(rng.random() * 15_000)
        if e["type"] == "step.failed":
            e["error"] = json.loads(ERRORS["failed"])
    return saga_id, out


# --- seeding: two producer processes, COPY FREEZE ------------------------------------


def _django_setup(dsn: str) -> None:
    os.environ["DATABASE_URL"] = dsn
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    os.environ.setdefault("DEBUG", "0")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from sagaadmin.gc_tuning import gc_tune

    gc_tune()  # as the ASGI server process does once it has loaded (sagaadmin/asgi.py)


@contextlib.contextmanager
def _frozen_copy(dsn: str, table: str, columns: str) -> Iterator[Any]:
    """COPY into ``table`` emptied in the same transaction: rows land frozen, all-visible."""
    with psycopg.connect(dsn) as conn:
        conn.execute(f"TRUNCATE {table}")
        with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN WITH (FREEZE)") as copy:
            yield copy
        conn.commit()


def seed_sagas_and_steps(dsn: str, n: int, now_us: int, out: Any) -> None:
    """Producer 1: saga and step rows, and the rollups of those sagas."""
    began = time.monotonic()
    try:
        _django_setup(dsn)
        from tracking.projection import FoldEvent, fold
        from tracking.rollups import duration_bin, saga_contribution, step_contribution

        sim = Simulator(n, now_us)
        text = TimeText()
        ts, iso = text.sql, text.iso
        saga_counts: Counter[tuple[int, str, str, str]] = Counter()
        step_counts: Counter[tuple[int, str, str, int]] = Counter()
        step_failures: Counter[tuple[int, str, str, int]] = Counter()
        e2000 = _us(datetime(2000, 1, 1, tzinfo=UTC))
        saga_bucket, step_bucket = 300_000_000, 3_600_000_000
        step_id = 0
        with (
            _frozen_copy(dsn, "tracking_saga", SAGA_COLUMNS) as saga_copy,
            _frozen_copy(dsn, "tracking_step", STEP_COLUMNS) as step_copy,
        ):
            saga_lines: list[str] = []
            step_lines: list[str] = []
            for i in range(n):
                s = sim.saga(i)
                pk = i + 1
                if i == n // 2:
                    step_id, state = _detail_rows(
                        n, s.started, pk, step_id, saga_lines, step_lines, FoldEvent, fold
                    )
                    _detail_rollups(
                        state,
                        saga_contribution,
                        step_contribution,
                        saga_counts,
                        step_counts,
                        step_failures,
                    )
                    continue
                type_name, abbr = SAGA_TYPES[s.type_index][:2]
                steps = STEP_DEFS[s.type_index]
                flags = (
                    ",anomaly,clock_skew,"
                    if s.anomaly and s.skew
                    else ",anomaly,"
                    if s.anomaly
                    else ",clock_skew,"
                    if s.skew
                    else ""
                )
                last_event = max(e[0] for e in s.events)
                services = {steps[0][1]} | {steps[e[2]][1] for e in s.events if e[2] >= 0}
                anomalies = (
                    f'[{{"event_id": "{event_uuid(i, 7)}", "service": "{steps[0][1]}", '
                    f'"type": "step.succeeded", "reason": "step.succeeded after the saga '
                    f'was {s.status}"}}]'
                    if s.anomaly
                    else "[]"
                )
                saga_lines.append(
                    f"{pk}\t{abbr}-{saga_hex(i)}\t{type_name}\t{s.status}\t{s.current_step}\t"
                    f"{ts(s.started)}\t{ts(s.ended) if s.ended else '\\N'}\t{ts(last_event)}\t"
                    f"{ts(last_event + 4_000)}\t"
                    f"{(s.ended - s.started) // 1000 if s.ended else '\\N'}\t\\N\t"
                    f"{s.last_error or '\\N'}\t\t"
                    f'{{"order_id": {pk}, "customer": "c-{s.customer}"}}\t'
                    f",{','.join(sorted(services))},\t"
                    f'["{saga_hex(i)}{saga_hex(i + n)}"]\t{flags}\t{anomalies}\t'
                    f"{EVENTS_PER_SAGA}\t{EVENTS_PER_SAGA}\n"
                )
                saga_counts[
                    (s.started - ((s.started - e2000) % saga_bucket), type_name, s.status, flags)
                ] += 1
                for j, (name, service, _) in enumerate(steps):
                    recs = s.recs[j]
                    if not recs:  # never reached: the projection has no row for it yet
                        continue
                    step_id += 1
                    forward = [r for r in recs if r[0] == "forward"]
                    undo = [r for r in recs if r[0] == "compensation"]
                    last = forward[-1]
                    if undo:
                        status = COMP_STATUS[undo[-1][4]]
                        error = undo[-1][5] if undo[-1][4] == "failed" else None
                    else:
                        status = STEP_STATUS[last[4]]
                        error = last[5]
                    records = []
                    for kind, attempt, start, end, result, err in recs:
                        ended_at = f'"{iso(end)}"' if end else "null"
                        records.append(
                            f'{{"kind": "{kind}", "attempt": {attempt}, '
                            f'"started_at": "{iso(start)}", "ended_at": {ended_at}, '
                            f'"outcome": "{result}", "error": {err or "null"}}}'
                        )
                        if kind == "forward" and end is not None:
                            key = (
                                end - ((end - e2000) % step_bucket),
                                type_name,
                                name,
                                duration_bin((end - start) // 1000),
                            )
                            step_counts[key] += 1
                            if result != "succeeded":
                                step_failures[key] += 1
                    end = last[3]
                    step_lines.append(
                        f"{step_id}\t{pk}\t{name}\t{j}\t{service}\t{status}\t{last[1]}\t"
                        f"{ts(last[2])}\t{ts(end) if end else '\\N'}\t"
                        f"{(end - last[2]) // 1000 if end else '\\N'}\t\\N\t{error or '\\N'}\t\t"
                        f"{undo[-1][1] if undo else 0}\t[{', '.join(records)}]\n"
                    )
                if len(saga_lines) >= CHUNK_SAGAS:
                    saga_copy.write("".join(saga_lines))
                    step_copy.write("".join(step_lines))
                    saga_lines.clear()
                    step_lines.clear()
            saga_copy.write("".join(saga_lines))
            step_copy.write("".join(step_lines))
        rollups = {"saga": saga_counts, "step": step_counts, "failures": step_failures}
        out.put(("ok", rollups, step_id, time.monotonic() - began))
    except BaseException as exc:
        out.put(("error", f"{type(exc).__name__}: {exc}", 0, 0.0))
        raise


def _detail_rows(
    n: int,
    started: int,
    pk: int,
    step_id: int,
    saga_lines: list[str],
    step_lines: list[str],
    fold_event: Any,
    fold: Any,
) -> tuple[int, Any]:
    """The 200-event saga's read-model rows, exactly as the projection folds them."""
    saga_id, events = detail_saga_events(n, started)
    folded = [
        fold_event(
            service=e["service"],
            event_id=event_uuid(n // 2, k),
            type=e["type"],
            occurred_at=_dt(e["at"]),
            received_at=_dt(e["received"]),
            saga_type=e.get("saga_type", ""),
            step=e["step"],
            attempt=e["attempt"],
            sequence=e["sequence"],
            error=e.get("error"),
            attributes={"order_id": pk, "customer": "c-42"} if k == 0 else {},
        )
        for k, e in enumerate(events)
    ]
    state = fold(saga_id, folded, skew_threshold=timedelta(seconds=30))

    def t(value: datetime | None) -> str:
        return "\\N" if value is None else value.isoformat()

    def j(value: Any) -> str:
        return "\\N" if value is None else _q(json.dumps(value))

    saga_lines.append(
        "\t".join(
            [
                str(pk),
                state.saga_id,
                state.saga_type,
                str(state.status),
                state.current_step,
                t(state.started_at),
                t(state.ended_at),
                t(state.last_event_at),
                t(state.last_received_at),
                "\\N" if state.duration_ms is None else str(state.duration_ms),
                t(state.deadline),
                j(state.last_error),
                state.idempotency_key,
                j(state.attributes),
                f",{','.join(state.services)},",
                j(state.trace_ids),
                f",{','.join(state.flags)}," if state.flags else "",
                j(state.anomalies),
                str(state.event_count),
                str(state.event_count),
            ]
        )
        + "\n"
    )
    for step in state.steps.values():
        step_id += 1
        step_lines.append(
            "\t".join(
                [
                    str(step_id),
                    str(pk),
                    step.name,
                    str(step.position),
                    step.service,
                    str(step.status),
                    str(step.attempt),
                    t(step.started_at),
                    t(step.ended_at),
                    "\\N" if step.duration_ms is None else str(step.duration_ms),
                    t(step.deadline),
                    j(step.last_error),
                    step.idempotency_key,
                    str(step.compensation_attempt),
                    j(step.attempts),
                ]
            )
            + "\n"
        )
    return step_id, state


def _detail_rollups(
    state: Any,
    saga_contribution: Any,
    step_contribution: Any,
    saga_counts: Counter[Any],
    step_counts: Counter[Any],
    step_failures: Counter[Any],
) -> None:
    """The detail saga's rollup contribution, by the product's own functions."""
    saga = saga_contribution(
        saga_type=state.saga_type,
        status=str(state.status),
        flags=f",{','.join(state.flags)}," if state.flags else "",
        started_at=state.started_at,
        event_count=state.event_count,
    )
    counts, failures = step_contribution(
        saga_type=state.saga_type, steps=[(s.name, s.attempts) for s in state.steps.values()]
    )
    for source, target in ((saga, saga_counts), (counts, step_counts), (failures, step_failures)):
        for (bucket, *rest), count in source.items():
            target[(_us(bucket), *rest)] += count


def seed_events(dsn: str, n: int, now_us: int, out: Any) -> None:
    """Producer 2: the event rows (8 per saga, 200 for the detail saga)."""
    began = time.monotonic()
    try:
        sim = Simulator(n, now_us)
        ts = TimeText().sql
        sha = hashlib.sha256
        event_id = 0
        with _frozen_copy(dsn, "tracking_telemetryevent", EVENT_COLUMNS) as copy:
            lines: list[str] = []
            for i in range(n):
                s = sim.saga(i)
                if i == n // 2:
                    event_id = _detail_event_rows(n, s.started, event_id, lines)
                    continue
                type_name, abbr = SAGA_TYPES[s.type_index][:2]
                steps = STEP_DEFS[s.type_index]
                saga_id = f"{abbr}-{saga_hex(i)}"
                trace = f"{saga_hex(i)}{saga_hex(i + n)}"
                attrs = f'{{"order_id": {i + 1}, "customer": "c-{s.customer}"}}'
                for k, (at, kind, j, attempt) in enumerate(eight_events(s)):
                    event_id += 1
                    name, service = steps[j][:2] if j >= 0 else ("", steps[0][1])
                    uuid = event_uuid(i, k)
                    received = at + (45_000_000 if s.skew and k == 3 else 1_500 + k * 700)
                    error = (
                        ERRORS["timed_out" if kind.endswith("timed_out") else "failed"]
                        if kind.endswith(("failed", "timed_out"))
                        else "\\N"
                    )
                    attributes = attrs if k == 0 else "{}"
                    payload = PAYLOAD if kind == "step.started" else "\\N"
                    lines.append(
                        f"{event_id}\t{SERVICE_ID[service]}\t{uuid}\t1\t{saga_id}\t{type_name}\t"
                        f"{kind}\t{name}\t{attempt}\t{ts(at)}\t{ts(received)}\t{k}\t\\N\t\t\\N\t"
                        f"{error}\t{attributes}\t{payload}\t{trace}\t{trace[k : k + 16]}\t"
                        f"{sha(uuid.encode()).hexdigest()}\n"
                    )
                if len(lines) >= CHUNK_SAGAS * EVENTS_PER_SAGA:
                    copy.write("".join(lines))
                    lines.clear()
            copy.write("".join(lines))
        out.put(("ok", None, event_id, time.monotonic() - began))
    except BaseException as exc:
        out.put(("error", f"{type(exc).__name__}: {exc}", 0, 0.0))
        raise


def _detail_event_rows(n: int, started: int, event_id: int, lines: list[str]) -> int:
    saga_id, events = detail_saga_events(n, started)
    for k, e in enumerate(events):
        event_id += 1
        uuid = event_uuid(n // 2, k)
        attributes = {"order_id": n // 2 + 1, "customer": "c-42"} if k == 0 else {}
        row = [
            str(event_id),
            str(SERVICE_ID[e["service"]]),
            uuid,
            "1",
            saga_id,
            e.get("saga_type", ""),
            e["type"],
            e["step"],
            str(e["attempt"]),
            _dt(e["at"]).isoformat(),
            _dt(e["received"]).isoformat(),
            str(e["sequence"]),
            "\\N",
            "",
            _q(json.dumps(e["message"])) if "message" in e else "\\N",
            _q(json.dumps(e["error"])) if "error" in e else "\\N",
            _q(json.dumps(attributes)),
            "\\N",
            "",
            "",
            sha256_hex(uuid),
        ]
        lines.append("\t".join(row) + "\n")
    return event_id


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- database ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schema:
    """The seeded tables' secondary indexes and constraints (not primary keys or checks),
    and the foreign keys of other (empty) tables that reference them."""

    indexes: list[tuple[str, str, str]]  # (table, index name, CREATE INDEX ...)
    constraints: list[tuple[str, str, str, str]]  # (table, name, type u/f, definition)

    @classmethod
    def read(cls, conn: psycopg.Connection) -> Schema:
        tables = list(SEEDED_TABLES)
        indexes = conn.execute(
            "SELECT indrelid::regclass::text, indexrelid::regclass::text, "
            "pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indrelid = ANY(%s::regclass[]) AND NOT indisprimary ORDER BY 1, 2",
            [tables],
        ).fetchall()
        constraints = conn.execute(
            # theirs, and other tables' foreign keys to them (TRUNCATE refuses those)
            "SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE (conrelid = ANY(%s::regclass[]) AND contype IN ('u', 'f')) "
            "OR (confrelid = ANY(%s::regclass[]) AND contype = 'f') ORDER BY 1, 2",
            [tables, tables],
        ).fetchall()
        return cls(indexes, constraints)


def schema_drop(conn: psycopg.Connection, schema: Schema) -> None:
    for table, name, _kind, _ in sorted(schema.constraints, key=lambda c: c[2] != "f"):
        conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    for _, name, _ in schema.indexes:
        conn.execute(f"DROP INDEX IF EXISTS {name}")


def schema_restore(dsn: str, schema: Schema, workers: int = 2) -> None:
    """Build the indexes (two at a time), then attach the constraints to them."""
    todo: queue.Queue[str] = queue.Queue()
    by_size = {"tracking_telemetryevent": 0, "tracking_step": 1, "tracking_saga": 2}
    for _table, _, create in sorted(schema.indexes, key=lambda x: by_size[x[0]]):
        todo.put(create)
    errors: list[str] = []

    def build() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET maintenance_work_mem = '512MB'")
            conn.execute("SET max_parallel_maintenance_workers = 0")  # we run two at once
            while True:
                try:
                    create = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    conn.execute(create)
                except psycopg.Error as exc:
                    errors.append(f"{create}: {exc}")

    threads = [threading.Thread(target=build) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError("rebuilding the indexes failed:\n" + "\n".join(errors))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, name, kind, definition in sorted(schema.constraints, key=lambda c: c[2] != "u"):
            if kind == "u":  # the unique index was built above under the same name
                conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} UNIQUE USING INDEX {name}")
            else:
                conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")


@dataclasses.dataclass
class SeedReport:
    sagas: int
    steps: int
    events: int
    seconds: dict[str, float]
    sizes: dict[str, str]
    checks: list[str]


def seed(dsn: str, n: int, now_us: int) -> SeedReport:
    seconds: dict[str, float] = {}
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema = Schema.read(conn)
        schema_drop(conn, schema)
        conn.execute(
            "INSERT INTO tracking_service (id, name, created_at, last_event_at) "
            "SELECT ord, name, now() - interval '30 days', now() "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS s(name, ord)",
            [list(SERVICES)],
        )
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=seed_sagas_and_steps, args=(dsn, n, now_us, results), daemon=True),
        ctx.Process(target=seed_events, args=(dsn, n, now_us, results), daemon=True),
    ]
    for proc in procs:
        proc.start()
    outs: list[tuple[str, Any, int, float]] = []
    try:
        while len(outs) < len(procs):
            try:
                outs.append(results.get(timeout=5))
            except queue.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if crashed or all(p.exitcode is not None for p in procs):
                    raise BenchError(f"a seeding process died (exit codes {crashed})") from None
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = [o[1] for o in outs if o[0] == "error"]
    if failed:
        raise BenchError("seeding failed: " + "; ".join(failed))
    rollups = next(o[1] for o in outs if o[1] is not None)
    steps = next(o[2] for o in outs if o[1] is not None)
    events = next(o[2] for o in outs if o[1] is None)
    seconds["COPY"] = time.monotonic() - started
    seconds["of which sagas+steps producer"] = next(o[3] for o in outs if o[1] is not None)
    seconds["events producer"] = next(o[3] for o in outs if o[1] is None)
    mark = time.monotonic()
    rollups_write(dsn, rollups)
    seconds["rollups"] = time.monotonic() - mark
    mark = time.monotonic()
    schema_restore(dsn, schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if Schema.read(conn) != schema:
            raise BenchError("the rebuilt indexes and constraints differ from the migrated ones")
        for table in ("tracking_service", *SEEDED_TABLES):
            conn.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({}, 'id'), (SELECT max(id) FROM {}))"
                ).format(sql.Literal(table), sql.Identifier(table))
            )
    seconds["indexes and constraints"] = time.monotonic() - mark
    mark = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    seconds["VACUUM (ANALYZE)"] = time.monotonic() - mark
    mark = time.monotonic()
    checks = seed_checks(dsn, n, events)
    seconds["checks"] = time.monotonic() - mark
    seconds["total"] = time.monotonic() - started
    return SeedReport(n, steps, events, seconds, table_sizes(dsn), checks)


def rollups_write(dsn: str, rollups: dict[str, Counter[Any]]) -> None:
    with psycopg.connect(dsn) as conn:
        with conn.cursor().copy(
            "COPY tracking_sagacount (bucket, saga_type, status, flags, count) FROM STDIN"
        ) as copy:
            for (bucket, saga_type, status, flags), count in rollups["saga"].items():
                copy.write_row((_dt(bucket), saga_type, status, flags, count))
        with conn.cursor().copy(
            "COPY tracking_stepstat (bucket, saga_type, step, bin, count, failures) FROM STDIN"
        ) as copy:
            for key, count in rollups["step"].items():
                bucket, saga_type, step, bin_ = key
                copy.write_row(
                    (_dt(bucket), saga_type, step, bin_, count, rollups["failures"][key])
                )
        # The coarse copies are the fine totals summed by hour and by day, as
        # rollup_compact keeps them (UTC boundaries, like floor_time's epoch).
        conn.execute(
            "INSERT INTO tracking_sagacounthour (bucket, saga_type, status, flags, count) "
            "SELECT date_bin('1 hour', bucket, '2000-01-01 00:00:00+00'), saga_type, status, "
            "flags, sum(count) FROM tracking_sagacount GROUP BY 1, 2, 3, 4"
        )
        conn.execute(
            "INSERT INTO tracking_stepstatday (bucket, saga_type, step, bin, count, failures) "
            "SELECT date_bin('1 day', bucket, '2000-01-01 00:00:00+00'), saga_type, step, bin, "
            "sum(count), sum(failures) FROM tracking_stepstat GROUP BY 1, 2, 3, 4"
        )
        conn.commit()


def seed_checks(dsn: str, n: int, events: int) -> list[str]:
    """The rollups agree with the sagas they summarise; the counts are as planned."""
    with psycopg.connect(dsn) as conn:
        q = conn.execute
        sagas = q("SELECT count(*) FROM tracking_saga").fetchone()[0]  # type: ignore[index]
        counted = q("SELECT sum(count) FROM tracking_sagacount").fetchone()[0]  # type: ignore[index]
        mismatch = q(
            "SELECT count(*) FROM (SELECT date_bin('5 minutes', started_at, "
            "'2000-01-01 00:00:00+00') AS bucket, saga_type, status, flags, count(*) AS n "
            "FROM tracking_saga WHERE event_count > 0 GROUP BY 1, 2, 3, 4) s "
            "FULL JOIN tracking_sagacount c USING (bucket, saga_type, status, flags) "
            "WHERE s.n IS DISTINCT FROM c.count"
        ).fetchone()[0]  # type: ignore[index]
        attempts, failures = q(
            "SELECT count(*), count(*) FILTER (WHERE a->>'outcome' <> 'succeeded') "
            "FROM tracking_step, jsonb_array_elements(attempts) a "
            "WHERE a->>'kind' = 'forward' AND a->>'outcome' <> 'running' "
            "AND a->>'ended_at' IS NOT NULL"
        ).fetchone()  # type: ignore[misc]
        stat = q("SELECT sum(count), sum(failures) FROM tracking_stepstat").fetchone()
        coarse = q(
            "SELECT (SELECT sum(count) FROM tracking_sagacounthour), "
            "(SELECT sum(count) FROM tracking_stepstatday), "
            "(SELECT sum(failures) FROM tracking_stepstatday)"
        ).fetchone()
        events_stored = q("SELECT count(*) FROM tracking_telemetryevent").fetchone()[0]  # type: ignore[index]
        big = q(
            "SELECT saga_id, event_count, (SELECT count(*) FROM tracking_telemetryevent e "
            "WHERE e.saga_id = s.saga_id) FROM tracking_saga s WHERE event_count = %s",
            [DETAIL_EVENTS],
        ).fetchall()
        mix = q(
            "SELECT status, round(100.0 * count(*) / sum(count(*)) OVER (), 2) "
            "FROM tracking_saga GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
    problems = []
    if sagas != n or counted != n or mismatch:
        problems.append(f"SagaCount: {counted} of {sagas} sagas, {mismatch} keys differ")
    if stat is None or (stat[0], stat[1]) != (attempts, failures):
        problems.append(f"StepStat {stat} != finished forward attempts ({attempts}, {failures})")
    if coarse != (counted, *(stat or (None, None))):
        problems.append(f"coarse rollups {coarse} != fine ({counted}, {stat})")
    if events_stored != events or events != (n - 1) * EVENTS_PER_SAGA + DETAIL_EVENTS:
        problems.append(f"{events_stored} events stored, {events} written")
    if len(big) != 1 or big[0][1] != big[0][2]:
        problems.append(f"detail saga: {big}")
    if problems:
        raise BenchError("the seed is inconsistent: " + "; ".join(problems))
    return [
        f"SagaCount = {counted:,} sagas in {sagas:,} (every bucket/type/status/flags key matches)",
        f"StepStat = {stat[0]:,} finished forward attempts, {stat[1]:,} failures (match steps)",
        f"detail saga {big[0][0]}: {big[0][2]} events",
        "status mix: " + ", ".join(f"{s} {p}%" for s, p in mix),
    ]


def table_sizes(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT relname, pg_size_pretty(pg_table_size(oid)), "
            "pg_size_pretty(pg_indexes_size(oid)) FROM pg_class "
            "WHERE relname = ANY(%s) ORDER BY pg_total_relation_size(oid) DESC",
            [list(SEEDED_TABLES)],
        ).fetchall()
    return {name: f"{heap} + {idx} indexes" for name, heap, idx in rows}


# --- measuring -----------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    label: str
    kind: str  # list | detail | overview
    page: str  # the dashboard URL
    api: str | None
    selector: Callable[[], Any]
    matches: str = ""


@dataclasses.dataclass
class Measured:
    case: Case
    ms: dict[str, list[float]]  # variant -> samples
    statements: list[str]
    per_statement: list[list[float]]
    other_cores: float

    def p(self, variant: str, q: float) -> float:
        values = sorted(self.ms.get(variant, []))
        if not values:
            return math.nan
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class CpuMeter:
    """CPU used by other programs while we measure: the machine's busy time minus ours."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def _ours(self) -> float:
        total = sum(os.times()[:2])
        for pid in self.pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += (int(fields[11]) + int(fields[12])) / self.tick
        return total

    def _machine(self) -> float:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(values[:3]) + sum(values[5:])) / self.tick

    def sample(self) -> tuple[float, float, float]:
        return time.monotonic(), self._machine(), self._ours()

    @staticmethod
    def other(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
        wall = max(after[0] - before[0], 1e-9)
        return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall


def replay(cursor: Any, statements: list[str], per: list[list[float]] | None) -> None:
    for index, statement in enumerate(statements):
        began = time.perf_counter()
        cursor.execute(statement)
        if cursor.description is not None:
            cursor.fetchall()
        if per is not None:
            per[index].append(1000 * (time.perf_counter() - began))


def measure(
    case: Case,
    client: Any,
    raw: Any,
    meter: CpuMeter,
    args: argparse.Namespace,
) -> Measured:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def get(url: str) -> None:
        response = client.get(url)
        if response.status_code != 200:
            raise BenchError(f"GET {url}: HTTP {response.status_code}")

    with CaptureQueriesContext(connection) as captured:
        get(case.page)
    statements = [q["sql"] for q in captured.captured_queries]
    per: list[list[float]] = [[] for _ in statements]
    variants: dict[str, Callable[[], Any]] = {"page": lambda: get(case.page)}
    if case.api:
        api = case.api
        variants["api"] = lambda: get(api)
    variants["selector"] = case.selector
    variants["raw"] = lambda: replay(raw, statements, None)
    warm: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.warmup):
        for name, fn in variants.items():
            began = time.perf_counter()
            fn()
            warm[name].append(time.perf_counter() - began)
    round_s = sum(sorted(v)[len(v) // 2] for v in warm.values())
    reps = min(args.reps, max(args.min_reps, int(args.budget / max(round_s, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    before = meter.sample()
    for _ in range(reps):
        for name, fn in variants.items():
            began = time.perf_counter()
            if name == "raw":
                replay(raw, statements, per)
            else:
                fn()
            samples[name].append(1000 * (time.perf_counter() - began))
    other = CpuMeter.other(before, meter.sample())
    return Measured(case, samples, statements, per, other)


def build_cases(n: int, deep_pages: int) -> list[Case]:
    from django.utils import timezone

    from tracking.overview import overview_get
    from tracking.selectors import (
        SagaFilter,
        saga_events_list,
        saga_get,
        saga_list,
        saga_queryset,
    )
    from tracking.timeline import saga_timeline_build

    now = datetime.now(UTC)
    day = (now - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)
    prefix = f"ref-{saga_hex(n // 3)[:2]}"
    filters: list[tuple[str, dict[str, str]]] = [
        ("list: no filter", {}),
        ("list: type=payment_refund", {"type": "payment_refund"}),
        ("list: status=failed", {"status": "failed"}),
        ("list: service=billing", {"service": "billing"}),
        ("list: step=refund", {"step": "refund"}),
        ("list: flag=anomaly", {"flag": "anomaly"}),
        (f"list: saga_id={prefix}", {"saga_id": prefix}),
        (
            "list: started 1 h range, 3 d ago",
            {
                "started_after": day.isoformat(),
                "started_before": (day + timedelta(hours=1)).isoformat(),
            },
        ),
        ("list: attr.order_id", {"attr.order_id": str(n // 3 + 1)}),
        ("list: attr.customer", {"attr.customer": "c-4242"}),
    ]
    cases = []
    for label, params in filters:
        query = f"?{urlencode(params)}" if params else ""
        flt = SagaFilter.from_params(params)
        count = saga_queryset(filters=flt).filter(started_at__isnull=False).count()
        cases.append(
            Case(
                label,
                "list",
                f"/sagas/{query}",
                f"/api/v1/sagas{query}",
                lambda flt=flt: saga_list(filters=flt),
                f"{count:,}",
            )
        )
    cursor = None
    for _ in range(deep_pages):
        cursor = saga_list(filters=SagaFilter(), cursor=cursor).next_cursor
        if cursor is None:
            raise BenchError(f"fewer than {deep_pages} pages of sagas")
    query = urlencode({"cursor": cursor})
    cases.append(
        Case(
            f"list: page {deep_pages + 1} (keyset)",
            "list",
            f"/sagas/?{query}",
            f"/api/v1/sagas?{query}",
            lambda: saga_list(filters=SagaFilter(), cursor=cursor),
            f"from {deep_pages * 50 + 1:,}",
        )
    )
    detail_id = f"ord-{saga_hex(n // 2)}"

    def detail() -> None:
        saga = saga_get(saga_id=detail_id)
        assert saga is not None
        events = saga_events_list(saga_id=detail_id)
        saga_timeline_build(saga=saga, events=events, now=timezone.now())

    cases.append(
        Case(
            "detail: 200 events",
            "detail",
            f"/sagas/{detail_id}",
            f"/api/v1/sagas/{detail_id}/events",
            detail,
            f"{DETAIL_EVENTS} events",
        )
    )
    for window in ("1h", "24h", "7d"):
        cases.append(
            Case(
                f"overview: {window}",
                "overview",
                f"/?window={window}",
                None,
                lambda window=window: overview_get(window=window, now=timezone.now()),
            )
        )
    return cases


# --- report --------------------------------------------------------------------------


def bar_for(kind: str) -> float:
    return {"list": BAR_LIST_MS, "detail": BAR_DETAIL_MS, "overview": BAR_OVERVIEW_MS}[kind]


def _pair(m: Measured, variant: str) -> str:
    if variant not in m.ms:
        return f"{'-':>15}"
    return f"{m.p(variant, 0.5):>7.1f}/{m.p(variant, 0.95):<7.1f}"


def report_table(results: list[Measured]) -> None:
    print(
        f"{'query':<34}{'matches':>11}{'stmts':>6}  {'page p50/p95':>15}{'api p50/p95':>16}"
        f"{'selector':>16}{'raw SQL':>16}{'page/raw':>9}{'n':>4}{'other':>7}\n"
        f"{'':<34}{'':>11}{'':>6}  {'':>15}{'':>16}{'p50/p95':>16}{'p50/p95':>16}{'p95':>9}"
    )
    for m in results:
        ratio = m.p("page", 0.95) / m.p("raw", 0.95)
        print(
            f"{m.case.label:<34}{m.case.matches:>11}{len(m.statements):>6}  {_pair(m, 'page')}"
            f" {_pair(m, 'api')} {_pair(m, 'selector')} {_pair(m, 'raw')}{ratio:>8.1f}x"
            f"{len(m.ms['page']):>4}{m.other_cores:>7.2f}"
        )


def report_bars(results: list[Measured]) -> list[Measured]:
    failing = []
    print(f"{'query':<34}{'page p95':>10}  {'bar':<10}{'':6}{'page/raw p95':>14}  bar")
    for m in results:
        page, raw = m.p("page", 0.95), m.p("raw", 0.95)
        bar = bar_for(m.case.kind)
        ok_time, ok_ratio = page <= bar, page <= BAR_RATIO * raw
        if not (ok_time and ok_ratio):
            failing.append(m)
        print(
            f"{m.case.label:<34}{page:>8.1f}ms  <= {bar:<4.0f}ms {'PASS' if ok_time else 'FAIL'}"
            f"  {page / raw:>10.1f}x  <= {BAR_RATIO:.0f}x {'PASS' if ok_ratio else 'FAIL'}"
        )
    return failing


def explain(raw: Any, m: Measured) -> None:
    """EXPLAIN ANALYZE of the case's slowest SELECT (by its median in the raw replay)."""
    selects = [
        (sorted(times)[len(times) // 2], stmt)
        for stmt, times in zip(m.statements, m.per_statement, strict=True)
        if stmt.lstrip().upper().startswith("SELECT") and times
    ]
    if not selects:
        return
    median, stmt = max(selects)
    print(f"\n--- {m.case.label}: slowest statement, {median:.1f} ms median in the raw replay")
    shown = re.sub(r"^SELECT .+? FROM", "SELECT ... FROM", stmt, count=1, flags=re.S)
    print(shown if len(shown) < 1500 else shown[:1500] + " ...")
    raw.execute(f"EXPLAIN (ANALYZE, BUFFERS) {stmt}")
    for (line,) in raw.fetchall():
        print(f"  {line}")


# --- main ----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SAGAS:,} sagas, 20 repetitions")
    p.add_argument(
        "--sagas", type=int, default=int(env_num("BENCH_SAGAS", FULL_SAGAS)), help="sagas seeded"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=int(env_num("BENCH_REPS", 40)),
        help="measured repetitions per query and variant",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=int(env_num("BENCH_WARMUP", 5)),
        help="unmeasured repetitions first",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=env_num("BENCH_BUDGET", 20),
        help="s per query at most: slow queries get fewer repetitions (no fewer than --min-reps)",
    )
    p.add_argument("--min-reps", type=int, default=10, help="see --budget")
    p.add_argument(
        "--deep-pages",
        type=int,
        default=int(env_num("BENCH_DEEP_PAGES", 200)),
        help="next_cursor followed this many times for the deep keyset page",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="measure the database a previous run seeded (its times have aged since)",
    )
    p.add_argument(
        "--no-explain", action="store_true", help="skip EXPLAIN ANALYZE of failing queries"
    )
    args = p.parse_args()
    if args.quick:
        args.sagas, args.reps = QUICK_SAGAS, min(args.reps, 20)
    return args


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill too
    run_started = time.monotonic()
    load_before = _loadavg()
    dsn = f"{base_dsn()}/{DB_NAME}"
    seeded: SeedReport | None = None
    if args.reuse:
        pg_version = server_version(dsn)
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM tracking_saga").fetchone()
        args.sagas = row[0] if row else 0
        print(f"reusing {DB_NAME}: {args.sagas:,} sagas", flush=True)
    else:
        dsn, pg_version = database_recreate(base_dsn(), DB_NAME)
        env = {**os.environ, "DATABASE_URL": dsn, "DJANGO_SETTINGS_MODULE": SETTINGS, "DEBUG": "0"}
        print(f"database {DB_NAME} recreated; migrating", flush=True)
        manage(env, "migrate", "--noinput", "-v", "0")
        print(f"seeding {args.sagas:,} sagas ...", flush=True)
        seeded = seed(dsn, args.sagas, _us(datetime.now(UTC)))
        print(f"seeded in {seeded.seconds['total']:.0f} s", flush=True)
    _django_setup(dsn)
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench").first()
    if user is None:
        user = user_model.objects.create_superuser("bench", "bench@example.com", "bench-pass")
    client = Client()
    client.force_login(user)
    print("building the queries (counting matches, following cursors) ...", flush=True)
    cases = build_cases(args.sagas, args.deep_pages)
    results: list[Measured] = []
    with psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as raw_conn:
        for name in ("json", "jsonb"):  # as Django does: JSON arrives as text
            raw_conn.adapters.register_loader(name, TextLoader)
        raw = raw_conn.cursor()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            django_pid = cursor.fetchone()[0]
        meter = CpuMeter([django_pid, raw_conn.info.backend_pid])
        for case in cases:
            print(f"measuring {case.label} ...", flush=True)
            results.append(measure(case, client, raw, meter, args))
        report(args, pg_version, seeded, results, load_before)
        failing = report_bars_section(results)
        if failing and not args.no_explain:
            print("\nEXPLAIN (ANALYZE, BUFFERS) of the slowest statement of each failing query:")
            for m in failing:
                explain(raw, m)
    print(f"\nrun time {time.monotonic() - run_started:.0f} s")
    return 0


def report(
    args: argparse.Namespace,
    pg_version: str,
    seeded: SeedReport | None,
    results: list[Measured],
    load_before: str,
) -> None:
    print()
    print(
        f"Saga Admin query benchmark: {os.cpu_count()} cores, PostgreSQL {pg_version}, "
        f"{args.sagas:,} sagas; up to {args.reps} repetitions per query after {args.warmup} "
        "warm-up, interleaved"
    )
    if seeded is not None:
        print(
            f"seeded {seeded.sagas:,} sagas, {seeded.steps:,} steps, {seeded.events:,} events in "
            f"{seeded.seconds['total']:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in seeded.seconds.items() if k != "total")
            + ")"
        )
        for table, size in seeded.sizes.items():
            print(f"  {table}: {size}")
        for line in seeded.checks:
            print(f"  {line}")
    others = [m.other_cores for m in results]
    mean = sum(others) / len(others)
    print(
        f"load: other programs used {mean:.2f} cores on average while measuring "
        f"(max {max(others):.2f}); loadavg before {load_before}, after {_loadavg()}"
    )
    if mean > DISTURBED_CORES:
        print(
            "WARNING: the machine was busy with other work while measuring: the times are "
            "inflated and noisier than on an idle machine (see the 'other' column)"
        )
    print(
        "times in ms; page/api = full request in-process (test client), selector = product "
        "query code only, raw SQL = the page's statements replayed through psycopg; "
        "other = cores used by other programs"
    )
    print()
    report_table(results)


def report_bars_section(results: list[Measured]) -> list[Measured]:
    print()
    print(
        f"bars: list and detail page p95 <= {BAR_LIST_MS:.0f} ms, overview page p95 <= "
        f"{BAR_OVERVIEW_MS:.0f} ms, page p95 <= {BAR_RATIO:.0f} x raw SQL p95"
    )
    failing = report_bars(results)
    verdict = "all PASS" if not failing else f"{len(failing)} of {len(results)} queries FAIL"
    print(f"\n{verdict}")
    return failing


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\nbench/queries.py: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
