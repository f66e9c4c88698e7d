"""The detector pass at scale, and ingest with step-duration statistics on and off, in one run.

Part 1, the detector pass, on the database ``sagaadmin_detect`` of the local
PostgreSQL server (recreated and generated on every run; ``--reuse`` keeps a
complete dataset from an earlier run): 1,000,000 sagas (``--quick``: 100,000),
of which 100,000 (10,000) are non-terminal and 1,000 of those stuck:

* 900,000 completed sagas, started over the 7 days before the reference time
  ``t_ref`` (the wall clock when the dataset was generated), eight events each
  (saga.started, started/succeeded for the steps order, payment and stock,
  saga.completed);
* 99,000 running sagas whose last event was received up to 10 minutes before
  ``t_ref``: between two steps (saga.started and the first one or two steps,
  each started and succeeded), so no rule can fire for them yet (a step
  running for minutes would be past its learned bound, 3 x its p99 of well
  under a second, and rightly found stuck);
* 1,000 running sagas, spread evenly among the running ones, silent for longer
  than the stuck threshold (``SAGAADMIN["STUCK_AFTER_SECONDS"]``, or the saga
  type's own): order done, then payment started and never heard of again,
  received 1 to 60 minutes past the threshold before ``t_ref``.

The events go into ``tracking_telemetryevent`` by COPY; the ``Saga`` and
``Step`` rows (``watch_at`` included) come from the product's own projection:
``tracking.read_model.read_model_create`` on chunks of 2,000 sagas, in the
transaction that stored their events, as ingest does (``content_hash``, which
only ingest's duplicate check reads, is a digest of saga id, event id and type,
not of the canonical encoding). Two generator processes (``--procs``);
completed sagas first, then the open ones (so their step bounds see the learned
durations, as a live system's would), ``rollup_compact`` after each, then
``VACUUM (ANALYZE)``. 3,000 sagas (the stuck ones and samples of the others)
are then re-folded from their stored events and compared with the stored rows.

Measured, after one pass at a time nothing is due (a warm process, as the
worker's detector is):

* ``detect_pass(now=t_ref)``, three times (``--passes``), each after a reset
  (incidents, alert windows and outbox messages deleted, the stuck sagas' rows
  restored as projection wrote them), so each is a first pass: its time, what
  it examined, the SQL statements it ran and their time (the rest is Python),
  other programs' CPU meanwhile; each must open exactly one ``stuck`` incident
  on each of the 1,000 stuck sagas and nothing else;
* the next pass (``t_ref`` + 10 s; nothing due any more);
* the naive detector's query, as raw SQL: the non-terminal sagas silent past
  the threshold (``status IN (running, compensating) AND last_received_at <
  t_ref - threshold``), median of five after one warm-up.

Bar (issue 5): one pass <= 1 s (the median of the passes) and exactly the
1,000 (every pass); the ratio to the naive query is printed for comparison.
``--profile`` adds a cProfile of one more first pass.

Part 2, ingest with the step-duration statistics on and off, on the database
``sagaadmin_detect_ingest`` (recreated every run): the batch-ingest phase of
bench/ingest.py (its clients, server and measurement) against a server started
with ``SAGAADMIN_STEP_STATS=1`` and one with ``=0``, in the order on, off, off,
on, on, off (``--rounds``: phases per setting), so slow drift (the table grows)
cancels out; only the "on" phases may write ``StepStatDelta`` rows (checked).
A phase during which other programs used over 0.25 cores is run again (up to
``--retries`` times), as the machine may be shared. Bar (issue 5): the mean
rate with statistics >= 0.9 x the mean rate without.

Usage: .venv/bin/python bench/detect.py [--quick] [--reuse] [--no-ingest] ...
(``--help`` lists every option). The base DSN comes from BENCH_PG (default
postgresql://postgres@127.0.0.1:5432). Exits 0 whether or not the bars pass
(it is a measurement), 1 on errors.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import hashlib
import io
import multiprocessing as mp
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any

import ingest
import psycopg
from common import (
    ROOT,
    BenchError,
    base_dsn,
    busy_seconds,
    database_recreate,
    env_num,
    manage,
    process_cpu,
    server_version,
)

DETECT_DB = "sagaadmin_detect"
INGEST_DB = "sagaadmin_detect_ingest"
SETTINGS = "sagaadmin.settings.base"
FULL, QUICK = (1_000_000, 100_000, 1_000), (100_000, 10_000, 1_000)  # sagas, open, stuck
BAR_PASS_S, BAR_STATS_RATIO = 1.0, 0.9
CHUNK = 2_000  # sagas per generator transaction
SEED = 20_260_505
SAGA_TYPE = ingest.SAGA_TYPE
STEPS = ingest.STEPS  # order, payment, stock: each reported by the service of that name
MEDIAN_MS = {"order": 40, "payment": 350, "stock": 120}
SAGA_SERVICE = "order"  # reports saga.started and saga.completed
S = 1_000_000  # microseconds
WEEK, HOUR, MINUTE = 7 * 24 * 3600 * S, 3600 * S, 60 * S
RECENT_WITHIN = 10 * MINUTE  # running sagas: last event received this long before t_ref at most
STUCK_PAST = (1 * MINUTE, 60 * MINUTE)  # stuck sagas: silent this much longer than the threshold
NEXT_PASS = timedelta(seconds=10)
NAIVE_REPS = 5
DISTURBED_CORES = 0.25  # other programs' average CPU above which the report warns
CPU_MIN_WINDOW = 0.2  # s: shorter windows are too few clock ticks to tell
# Batch requests pre-generated per phase, in events/s: twice bench/ingest.py's
# cap, as one client's connection can be served much faster than the others'.
INGEST_MAX_RATE = 2 * ingest.MAX_BATCH_EVENTS_PER_S
NON_TERMINAL = ("running", "compensating")
MASK64, MASK128 = 2**64 - 1, 2**128 - 1
EVENT_COLUMNS = (
    "service_id, event_id, protocol_version, saga_id, saga_type, type, step, attempt, "
    "occurred_at, received_at, sequence, deadline, idempotency_key, message, error, "
    "attributes, payload, trace_id, span_id, content_hash"
)
META_TABLE, STUCK_TABLE = "bench_detect_meta", "bench_detect_stuck"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- the dataset ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Which saga index is what, and the times everything is placed against."""

    sagas: int
    open: int
    stuck: int
    t_ref_us: int
    threshold_us: int  # the stuck threshold of SAGA_TYPE

    @property
    def completed(self) -> int:
        return self.sagas - self.open

    def stuck_offsets(self) -> frozenset[int]:
        """Offsets among the open sagas of the stuck ones, spread evenly."""
        return frozenset(k * self.open // self.stuck for k in range(self.stuck))

    def stuck_ids(self) -> list[str]:
        return sorted(saga_id(self.completed + j) for j in self.stuck_offsets())

    @property
    def t_ref(self) -> datetime:
        return _dt(self.t_ref_us)


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _us(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1)


def saga_id(i: int) -> str:
    return f"order-{(i * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & MASK64:016x}"


def event_id(i: int, k: int) -> str:
    h = f"{((i * 16 + k) * 0x5851F42D4C957F2D6A09E667F3BCC909 + 0x1234567) & MASK128:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TimeText:
    """Integer microseconds -> COPY text, the minute's prefix cached."""

    def __init__(self) -> None:
        self._prefix: dict[int, str] = {}

    def __call__(self, us: int) -> str:
        minute, rest = divmod(us, MINUTE)
        prefix = self._prefix.get(minute)
        if prefix is None:
            prefix = self._prefix[minute] = _dt(minute * MINUTE).strftime("%Y-%m-%d %H:%M:")
        return f"{prefix}{rest // S:02d}.{rest % S:06d}+00"


def saga_timeline(i: int, layout: Layout, stuck: frozenset[int], rng: Random) -> list[Any]:
    """Saga ``i``'s events as (type, step, occurred_us, received_us), in the order sent."""
    events: list[tuple[str, str, int]] = [("saga.started", "", 0)]
    t = 0
    j = i - layout.completed
    if j < 0:
        done, tail = STEPS, [("saga.completed", "")]
    elif j in stuck:
        done, tail = STEPS[:1], [("step.started", STEPS[1])]
    else:
        done, tail = STEPS[: 1 + (i % 2)], []
    for step in done:
        t += rng.randrange(1_000, 20_000)
        events.append(("step.started", step, t))
        t += int(MEDIAN_MS[step] * 1000 * rng.lognormvariate(0.0, 0.5))
        events.append(("step.succeeded", step, t))
    for kind, step in tail:
        t += rng.randrange(1_000, 20_000)
        events.append((kind, step, t))
    # Place the saga in time: completed ones start over the week before t_ref (the
    # last hour excepted), the open ones end where their kind says.
    if j < 0:
        start = layout.t_ref_us - WEEK + (WEEK - HOUR) * i // layout.completed
    elif j in stuck:
        start = layout.t_ref_us - layout.threshold_us - rng.randrange(*STUCK_PAST) - t
    else:
        start = layout.t_ref_us - rng.randrange(S, RECENT_WITHIN) - t
    return [
        (kind, step, start + offset, start + offset + rng.randrange(2_000, 30_000))
        for kind, step, offset in events
    ]


# --- generation (runs in the generator processes) -------------------------------------

_worker: dict[str, Any] = {}


def django_setup(dsn: str) -> None:
    os.environ["DATABASE_URL"] = dsn
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    os.environ.setdefault("DEBUG", "0")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def _generator_init(dsn: str, layout: Layout, services: dict[str, int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    os.environ["PGOPTIONS"] = "-c synchronous_commit=off"  # a bulk load: no flush per commit
    django_setup(dsn)
    _worker.update(layout=layout, stuck=layout.stuck_offsets(), services=services, ts=TimeText())


def _generate_chunk(bounds: tuple[int, int]) -> tuple[int, int, dict[str, float]]:
    """Store sagas [start, end)'s events by COPY and project them, in one transaction."""
    from django.db import connection, transaction

    from tracking.projection import FoldEvent
    from tracking.read_model import read_model_create

    began = time.perf_counter()
    layout: Layout = _worker["layout"]
    stuck: frozenset[int] = _worker["stuck"]
    services: dict[str, int] = _worker["services"]
    ts: TimeText = _worker["ts"]
    start, end = bounds
    rng = Random(SEED * 1_000_003 + start)
    lines: list[str] = []
    by_saga: dict[str, list[Any]] = {}
    for i in range(start, end):
        sid = saga_id(i)
        attributes = {"order_id": f"ORD-{i:010d}"}
        attributes_text = f'{{"order_id": "ORD-{i:010d}"}}'
        fold_events = by_saga[sid] = []
        for k, (kind, step, occurred, received) in enumerate(saga_timeline(i, layout, stuck, rng)):
            service = step or SAGA_SERVICE
            eid = event_id(i, k)
            first = kind == "saga.started"
            digest = hashlib.sha256(f"{sid}/{eid}/{kind}".encode()).hexdigest()
            lines.append(
                f"{services[service]}\t{eid}\t1\t{sid}\t{SAGA_TYPE if first else ''}\t{kind}\t"
                f"{step}\t1\t{ts(occurred)}\t{ts(received)}\t{k}\t\\N\t\t\\N\t\\N\t"
                f"{attributes_text if first else '{}'}\t\\N\t\t\t{digest}\n"
            )
            fold_events.append(
                FoldEvent(
                    service=service,
                    event_id=eid,
                    type=kind,
                    occurred_at=_dt(occurred),
                    received_at=_dt(received),
                    saga_type=SAGA_TYPE if first else "",
                    step=step,
                    attempt=1,
                    sequence=k,
                    attributes=attributes if first else {},
                )
            )
    built = time.perf_counter()
    with transaction.atomic():
        with connection.cursor() as cursor:
            copy_sql = f"COPY tracking_telemetryevent ({EVENT_COLUMNS}) FROM STDIN"
            with cursor.cursor.copy(copy_sql) as copy:
                copy.write("".join(lines))
        copied = time.perf_counter()
        created = read_model_create(events=by_saga)
        projected = time.perf_counter()
    if len(created) != len(by_saga):
        raise BenchError(f"sagas {start}-{end}: {len(by_saga) - len(created)} rows existed already")
    seconds = {
        "build": built - began,
        "copy": copied - built,
        "project": projected - copied,
        "commit": time.perf_counter() - projected,
    }
    return end - start, len(lines), seconds


# --- generation (the parent) -------------------------------------------------------------

# Indexes kept during the load: primary keys, and what read_model_create's
# INSERT ... ON CONFLICT (saga_id) needs. The rest are built after it.
LOADED_TABLES = ("tracking_telemetryevent", "tracking_saga", "tracking_step")
KEPT_INDEXES = ("tracking_saga_saga_id_key",)


def _index_defs(conn: psycopg.Connection) -> list[tuple[str, str, str, str]]:
    """(table, name, kind, definition) of the loaded tables' indexes and unique constraints."""
    rows = conn.execute(
        "SELECT c.relname, i.relname, coalesce(con.contype::text, 'i'), "
        "coalesce(pg_get_constraintdef(con.oid), pg_get_indexdef(i.oid)) "
        "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_class c ON c.oid = x.indrelid "
        "LEFT JOIN pg_constraint con ON con.conindid = i.oid AND con.contype IN ('p', 'u') "
        "WHERE c.relname = ANY(%s) ORDER BY 1, 2",
        (list(LOADED_TABLES),),
    ).fetchall()
    return [(t, n, k, d) for t, n, k, d in rows]


def indexes_drop(dsn: str) -> list[tuple[str, str, str, str]]:
    """Drop the secondary indexes and unique constraints of the loaded tables; return them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        dropped = [d for d in _index_defs(conn) if d[2] != "p" and d[1] not in KEPT_INDEXES]
        for table, name, kind, _ in dropped:
            if kind == "u":
                conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            else:
                conn.execute(f'DROP INDEX "{name}"')
    return dropped


def indexes_build(dsn: str, dropped: list[tuple[str, str, str, str]]) -> None:
    """Build what ``indexes_drop`` dropped, from its definitions; check the schema came back."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        expected = _index_defs(conn) + dropped
        conn.execute("SET maintenance_work_mem = '1GB'")
        for table, name, kind, definition in dropped:
            began = time.monotonic()
            if kind == "u":
                conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
            else:
                conn.execute(definition)
            print(f"  {name}: {time.monotonic() - began:.0f} s", flush=True)
        if sorted(_index_defs(conn)) != sorted(expected):
            raise BenchError("the rebuilt indexes differ from the migrated ones")


@dataclasses.dataclass
class Generated:
    seconds: float
    events: int
    parts: dict[str, float]  # generator processes' time by part, summed over processes
    load_seconds: float  # the generator processes' wall time
    index_seconds: float  # building the indexes deferred during the load


def generate(dsn: str, layout: Layout, procs: int) -> Generated:
    """Fill the migrated database; return what it took."""
    from django.db import connection

    from tracking.models import Service
    from tracking.rollups import rollup_compact

    began = time.monotonic()
    services = {
        name: Service.objects.get_or_create(name=name)[0].pk for name in (SAGA_SERVICE, *STEPS)
    }
    connection.close()
    dropped = indexes_drop(dsn)
    total_events = 0
    parts: dict[str, float] = {}
    ctx = mp.get_context("spawn")
    for label, first, last in (
        ("completed sagas", 0, layout.completed),
        ("open sagas", layout.completed, layout.sagas),
    ):
        chunks = [(s, min(s + CHUNK, last)) for s in range(first, last, CHUNK)]
        done = events = 0
        step_began = time.monotonic()
        next_report = 0.0
        print(f"generating {last - first:,} {label} ({procs} processes) ...", flush=True)
        with ctx.Pool(procs, _generator_init, (dsn, layout, services)) as pool:
            for sagas, n_events, seconds in pool.imap_unordered(_generate_chunk, chunks):
                done += sagas
                events += n_events
                for k, v in seconds.items():
                    parts[k] = parts.get(k, 0.0) + v
                elapsed = time.monotonic() - step_began
                if elapsed >= next_report or done == last - first:
                    next_report = elapsed + 15
                    print(
                        f"  {done:>9,} / {last - first:,} sagas, {events:>10,} events, "
                        f"{done / elapsed:>7,.0f} sagas/s",
                        flush=True,
                    )
        total_events += events
        compact_began = time.monotonic()
        rollup_compact()  # what the worker's housekeeping does every few minutes
        print(f"  rollups compacted in {time.monotonic() - compact_began:.1f} s", flush=True)
    load_seconds = time.monotonic() - began
    print(f"building {len(dropped)} indexes deferred during the load ...", flush=True)
    build_began = time.monotonic()
    indexes_build(dsn, dropped)
    index_seconds = time.monotonic() - build_began
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(  # what ingest's service_touch keeps (to the second)
            "UPDATE tracking_service s SET last_event_at = (SELECT max(received_at) "
            "FROM tracking_telemetryevent e WHERE e.service_id = s.id)"
        )
        vacuum_began = time.monotonic()
        print("VACUUM (ANALYZE) ...", flush=True)
        conn.execute("VACUUM (ANALYZE)")
        print(f"  done in {time.monotonic() - vacuum_began:.0f} s", flush=True)
    return Generated(time.monotonic() - began, total_events, parts, load_seconds, index_seconds)


def meta_save(dsn: str, layout: Layout, generated: Generated) -> None:
    """Record the dataset and, per stuck saga, its row as projection wrote it."""
    with psycopg.connect(dsn) as conn:
        ids = layout.stuck_ids()
        conn.execute(
            f"CREATE TABLE {STUCK_TABLE} AS SELECT saga_id, watch_at, version "
            "FROM tracking_saga WHERE saga_id = ANY(%s)",
            (ids,),
        )
        conn.execute(f"ALTER TABLE {STUCK_TABLE} ADD PRIMARY KEY (saga_id)")
        row = conn.execute(f"SELECT count(*) FROM {STUCK_TABLE}").fetchone()
        if not row or row[0] != len(ids):
            raise BenchError(f"{len(ids) - (row[0] if row else 0)} stuck sagas have no row")
        conn.execute(
            f"CREATE TABLE {META_TABLE} (sagas int, open int, stuck int, t_ref_us bigint, "
            "threshold_us bigint, events bigint, seconds float8, generated_at timestamptz)"
        )
        conn.execute(
            f"INSERT INTO {META_TABLE} VALUES (%s, %s, %s, %s, %s, %s, %s, now())",
            (
                layout.sagas,
                layout.open,
                layout.stuck,
                layout.t_ref_us,
                layout.threshold_us,
                generated.events,
                generated.seconds,
            ),
        )


def meta_load(dsn: str) -> tuple[Layout, int, float, datetime] | None:
    """The complete dataset in the database, or None (no database, not generated, or partial)."""
    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
                (META_TABLE, STUCK_TABLE),
            ).fetchone()
            if not row or not row[0]:
                return None
            meta = conn.execute(f"SELECT * FROM {META_TABLE}").fetchone()
    except psycopg.OperationalError:
        return None
    if meta is None:
        return None
    sagas, open_, stuck, t_ref_us, threshold_us, events, seconds, generated_at = meta
    return Layout(sagas, open_, stuck, t_ref_us, threshold_us), events, seconds, generated_at


# --- checks and reset ---------------------------------------------------------------------


def reset(dsn: str) -> int:
    """Undo earlier passes: no incidents, alerts or windows; stuck sagas as projection left them.

    Returns how many saga rows had to be restored.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("DELETE FROM tracking_incident")
            conn.execute("DELETE FROM tracking_alertwindow")
            conn.execute("DELETE FROM outbox_outboxmessage")
            restored = conn.execute(
                f"UPDATE tracking_saga s SET watch_at = b.watch_at, version = b.version, "
                f"open_incidents = '' FROM {STUCK_TABLE} b WHERE s.saga_id = b.saga_id AND "
                "(s.watch_at IS DISTINCT FROM b.watch_at OR s.version <> b.version "
                "OR s.open_incidents <> '')"
            ).rowcount
            others = conn.execute(
                "SELECT count(*) FROM tracking_saga WHERE open_incidents <> ''"
            ).fetchone()
        if others and others[0]:
            raise BenchError(f"{others[0]} other sagas have open_incidents set: regenerate")
        if restored:
            conn.execute(
                "VACUUM (ANALYZE) tracking_saga, tracking_incident, tracking_alertwindow, "
                "outbox_outboxmessage"
            )
    return restored


def refold_check(layout: Layout) -> list[str]:
    """Re-fold the stuck sagas and samples of the others from their stored events.

    The saga and step rows must be what the projection computes from them; so
    must ``watch_at``, with today's policy (a stuck saga's may differ when the
    learned step durations moved since it was written: it is then only checked
    to be due at ``t_ref``). Raises BenchError on a difference.
    """
    from tracking.detection import watch_at
    from tracking.models import Saga, Step
    from tracking.policy import policy_load
    from tracking.projection import fold
    from tracking.read_model import (
        SAGA_FIELDS,
        STEP_FIELDS,
        saga_row_values,
        skew_threshold,
        stored_events_get,
    )

    stuck = set(layout.stuck_ids())
    step = max(1, layout.completed // 1000)
    stuck_offsets = layout.stuck_offsets()
    active = [j for j in range(layout.open) if j not in stuck_offsets]
    running = [saga_id(layout.completed + j) for j in active[:: max(1, len(active) // 1000)]]
    samples = {
        "completed": [saga_id(i) for i in range(0, layout.completed, step)],
        "running": running,
        "stuck": sorted(stuck),
    }
    policy = policy_load(now=layout.t_ref)
    threshold = skew_threshold()
    problems: list[str] = []
    moved = 0
    for kind, ids in samples.items():
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = {
                r["saga_id"]: r
                for r in Saga.objects.filter(saga_id__in=chunk).values(
                    "id", "saga_id", "watch_at", *SAGA_FIELDS
                )
            }
            steps: dict[int, dict[str, list[Any]]] = {}
            for s in Step.objects.filter(saga__saga_id__in=chunk).values(
                "saga_id", "name", *STEP_FIELDS
            ):
                steps.setdefault(s["saga_id"], {})[s["name"]] = [s[f] for f in STEP_FIELDS]
            events = stored_events_get(saga_ids=chunk)
            for sid in chunk:
                row = rows.get(sid)
                if row is None:
                    problems.append(f"{sid}: no saga row")
                    continue
                state = fold(sid, events.get(sid, ()), skew_threshold=threshold)
                values = saga_row_values(state)
                wrong = [k for k, v in values.items() if row[k] != v]
                expected_steps = {
                    n: [getattr(st, f) for f in STEP_FIELDS] for n, st in state.steps.items()
                }
                if steps.get(row["id"], {}) != expected_steps:
                    wrong.append("steps")
                watch = watch_at(state, policy, open_incidents=False)
                if row["watch_at"] != watch:
                    if kind == "stuck" and row["watch_at"] and row["watch_at"] <= layout.t_ref:
                        moved += 1
                    else:
                        wrong.append(f"watch_at {row['watch_at']} (projection: {watch})")
                expected_status = "completed" if kind == "completed" else "running"
                if state.status != expected_status:
                    wrong.append(f"status {state.status}")
                if wrong:
                    problems.append(f"{sid} ({kind}): {', '.join(wrong)}")
    if problems:
        shown = "\n  ".join(problems[:10])
        raise BenchError(f"{len(problems)} sampled sagas differ from their re-fold:\n  {shown}")
    total = sum(len(v) for v in samples.values())
    kinds = ", ".join(f"{len(v):,} {k}" for k, v in samples.items())
    lines = [
        f"re-fold check: {total:,} sagas ({kinds}) re-folded from their stored events: "
        "saga rows, step rows and watch_at as stored"
    ]
    if moved:
        lines.append(
            f"  ({moved} stuck sagas' watch_at differ from today's policy's (learned step "
            "durations moved since): all due at t_ref)"
        )
    return lines


# --- part 1: measuring the pass -----------------------------------------------------------


@dataclasses.dataclass
class SqlMeter:
    """Counts statements and the time spent in them (driver + server), via execute_wrapper."""

    statements: int = 0
    seconds: float = 0.0

    def __call__(self, execute: Callable[..., Any], *args: Any) -> Any:
        began = time.perf_counter()
        try:
            return execute(*args)
        finally:
            self.statements += 1
            self.seconds += time.perf_counter() - began


@dataclasses.dataclass
class PassOutcome:
    result: Any  # tracking.detector.PassResult
    wall: float
    meter: SqlMeter
    other_cores: float  # other programs' CPU during the pass (not this process, not PostgreSQL)
    incidents: dict[str, int] = dataclasses.field(default_factory=dict)  # after it, by kind
    wrong: int = 0  # stuck incidents on sagas not meant to be stuck
    missed: int = 0  # stuck sagas without one
    messages: int = 0  # outbox messages after it

    def exact(self, layout: Layout) -> bool:
        return (
            self.incidents == {"stuck": layout.stuck}
            and not self.wrong
            and not self.missed
            and self.result.examined == layout.stuck
            and self.result.opened == layout.stuck
        )


def _cpu_now() -> tuple[float, float]:
    """(machine busy CPU s, this process's + PostgreSQL's CPU s)."""
    ours = 0.0
    for pid, proc in process_cpu().items():
        if pid == os.getpid():
            ours += proc.own
        elif proc.name == "postgres" or proc.name.startswith("postgres:"):
            ours += proc.with_children
    return busy_seconds(), ours


def timed_pass(now: datetime) -> PassOutcome:
    from django.db import connection

    from tracking.detector import detect_pass

    meter = SqlMeter()
    machine, ours = _cpu_now()
    with connection.execute_wrapper(meter):
        began = time.perf_counter()
        result = detect_pass(now=now)
        wall = time.perf_counter() - began
    machine_after, ours_after = _cpu_now()
    other = max(0.0, (machine_after - machine) - (ours_after - ours)) / wall
    return PassOutcome(result, wall, meter, other)


def incidents_check(outcome: PassOutcome, layout: Layout) -> None:
    """Fill in what the pass left: incidents by kind, on which sagas, outbox messages."""
    from outbox.models import OutboxMessage
    from tracking.models import Incident

    for kind in Incident.objects.values_list("kind", flat=True):
        outcome.incidents[kind] = outcome.incidents.get(kind, 0) + 1
    found = set(
        Incident.objects.filter(kind="stuck", resolved_at__isnull=True).values_list(
            "saga__saga_id", flat=True
        )
    )
    expected = set(layout.stuck_ids())
    outcome.wrong, outcome.missed = len(found - expected), len(expected - found)
    outcome.messages = OutboxMessage.objects.count()


def naive_scan(dsn: str, layout: Layout) -> tuple[float, int]:
    """Median time of the raw SQL a detector without watch_at would run; its row count."""
    query = "SELECT id FROM tracking_saga WHERE status = ANY(%s) AND last_received_at < %s"
    since = _dt(layout.t_ref_us - layout.threshold_us)
    times = []
    rows = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for rep in range(NAIVE_REPS + 1):
            began = time.perf_counter()
            rows = len(conn.execute(query, (list(NON_TERMINAL), since)).fetchall())
            if rep:  # the first one warms up
                times.append(time.perf_counter() - began)
    return statistics.median(times), rows


@dataclasses.dataclass
class DetectOutcome:
    layout: Layout
    events: int
    generated_seconds: float
    generated_at: datetime
    generated_now: Generated | None
    sizes: dict[str, str]
    checks: list[str]
    due: int
    watched: int
    passes: list[PassOutcome]  # first passes, each after a reset
    next_pass: PassOutcome
    naive_seconds: float
    naive_rows: int
    profile: str = ""

    @property
    def median(self) -> float:
        return statistics.median(p.wall for p in self.passes)

    @property
    def exact(self) -> bool:
        return all(p.exact(self.layout) for p in self.passes)


def run_detect_part(args: argparse.Namespace) -> DetectOutcome:
    dsn = f"{base_dsn()}/{DETECT_DB}"
    found = meta_load(dsn) if args.reuse else None
    generated_now: Generated | None = None
    if found is not None:
        layout, events, seconds, generated_at = found
        print(
            f"reusing {DETECT_DB}: {layout.sagas:,} sagas generated {generated_at:%Y-%m-%d %H:%M}",
            flush=True,
        )
        django_setup(dsn)
    else:
        if args.reuse:
            print(f"{DETECT_DB} holds no complete dataset: generating it", flush=True)
        dsn, _ = database_recreate(base_dsn(), DETECT_DB)
        env = {**os.environ, "DATABASE_URL": dsn, "DJANGO_SETTINGS_MODULE": SETTINGS, "DEBUG": "0"}
        print(f"database {DETECT_DB} recreated; migrating", flush=True)
        manage(env, "migrate", "--noinput", "-v", "0")
        django_setup(dsn)
        from tracking.policy import policy_load

        threshold = policy_load().for_type(SAGA_TYPE).stuck_after
        t_ref_us = _us(datetime.now(UTC)) // S * S
        layout = Layout(
            args.sagas, args.open, args.stuck, t_ref_us, threshold // timedelta(0, 0, 1)
        )
        generated_now = generate(dsn, layout, args.procs)
        meta_save(dsn, layout, generated_now)
        events, seconds, generated_at = (
            generated_now.events,
            generated_now.seconds,
            datetime.now(UTC),
        )
        print(f"generated in {seconds:.0f} s", flush=True)
    return measure_detect(args, dsn, layout, events, seconds, generated_at, generated_now)


def measure_detect(
    args: argparse.Namespace,
    dsn: str,
    layout: Layout,
    events: int,
    generated_seconds: float,
    generated_at: datetime,
    generated_now: Generated | None,
) -> DetectOutcome:
    restored = reset(dsn)
    if restored:
        print(f"reset: {restored:,} stuck sagas restored, incidents and alerts deleted", flush=True)
    print("checking the read model against the projection ...", flush=True)
    checks = refold_check(layout)
    t_ref = layout.t_ref
    with psycopg.connect(dsn, autocommit=True) as conn:
        counts = conn.execute(
            "SELECT count(*) FILTER (WHERE watch_at <= %s), count(watch_at), min(watch_at) "
            "FROM tracking_saga",
            (t_ref,),
        ).fetchone()
        sizes = {
            table: conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size(%s::regclass))", (table,)
            ).fetchone()[0]  # type: ignore[index]
            for table in ("tracking_telemetryevent", "tracking_saga", "tracking_step")
        }
    assert counts is not None
    due, watched, earliest = counts
    if due != layout.stuck:
        raise BenchError(f"{due:,} sagas due at t_ref, expected {layout.stuck:,}: regenerate")
    print("warming up: a pass at a time nothing is due ...", flush=True)
    warm = timed_pass(earliest - timedelta(seconds=1))
    if warm.result.examined:
        raise BenchError(f"the warm-up pass examined {warm.result.examined} sagas")
    passes: list[PassOutcome] = []
    for n in range(args.passes):
        if n:
            reset(dsn)
        print(f"measuring the detector pass at t_ref ({n + 1} of {args.passes}) ...", flush=True)
        outcome = timed_pass(t_ref)
        incidents_check(outcome, layout)
        passes.append(outcome)
    next_pass = timed_pass(t_ref + NEXT_PASS)
    print("measuring the naive query ...", flush=True)
    naive_seconds, naive_rows = naive_scan(dsn, layout)
    profile = ""
    if args.profile:
        print("profiling one more first pass (reset first) ...", flush=True)
        reset(dsn)
        profiler = cProfile.Profile()
        profiler.enable()
        timed_pass(t_ref)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
        stats.print_stats(30)
        stats.print_stats(r"tracking/|outbox/", 25)  # the product's own functions
        profile = out.getvalue()
    return DetectOutcome(
        layout=layout,
        events=events,
        generated_seconds=generated_seconds,
        generated_at=generated_at,
        generated_now=generated_now,
        sizes=sizes,
        checks=checks,
        due=due,
        watched=watched,
        passes=passes,
        next_pass=next_pass,
        naive_seconds=naive_seconds,
        naive_rows=naive_rows,
        profile=profile,
    )


def _pass_line(label: str, p: PassOutcome) -> str:
    r, m = p.result, p.meter
    return (
        f"{label:<30}{p.wall:>7.3f} s  examined {r.examined:,}, opened {r.opened:,}, "
        f"resolved {r.resolved:,}, busy {r.skipped:,}; SQL {m.statements} statements "
        f"{m.seconds:.3f} s, Python {p.wall - m.seconds:.3f} s"
        + (f"; other programs {p.other_cores:.2f} cores" if p.wall >= CPU_MIN_WINDOW else "")
    )


def report_detect(d: DetectOutcome, pg_version: str) -> None:
    lay = d.layout
    print()
    print(f"Saga Admin detector benchmark: {os.cpu_count()} cores, PostgreSQL {pg_version}")
    print(
        f"dataset {DETECT_DB}: {lay.sagas:,} sagas ({lay.completed:,} completed, "
        f"{lay.open - lay.stuck:,} running and active, {lay.stuck:,} stuck), {d.events:,} events; "
        f"t_ref {lay.t_ref:%Y-%m-%d %H:%M:%S} UTC, stuck threshold {lay.threshold_us / S:g} s"
    )
    if d.generated_now is not None:
        g = d.generated_now
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in g.parts.items())
        print(
            f"  generated in {g.seconds:.0f} s this run: load {g.load_seconds:.0f} s "
            f"(2,000-saga transactions; {parts}, summed over the generator processes), "
            f"deferred indexes {g.index_seconds:.0f} s, VACUUM (ANALYZE) "
            f"{g.seconds - g.load_seconds - g.index_seconds:.0f} s"
        )
    else:
        print(f"  reused: generated {d.generated_at:%Y-%m-%d %H:%M} in {d.generated_seconds:.0f} s")
    print("  " + ", ".join(f"{t} {s}" for t, s in d.sizes.items()))
    for line in d.checks:
        print(f"  {line}")
    print(f"  watch_at set on {d.watched:,} sagas; due at t_ref (watch_at <= t_ref): {d.due:,}")
    print()
    for n, p in enumerate(d.passes):
        print(_pass_line(f"first pass at t_ref, run {n + 1}", p))
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(p.incidents.items())) or "none"
        print(
            f"  incidents: {kinds}; on the stuck sagas: {lay.stuck - p.missed:,} of "
            f"{lay.stuck:,}, on others: {p.wrong:,}; outbox messages: {p.messages:,}"
        )
    print(_pass_line("next pass, t_ref + 10 s", d.next_pass))
    print(
        f"{'naive query, raw SQL':<30}{d.naive_seconds:>7.3f} s  median of {NAIVE_REPS}: "
        f"{d.naive_rows:,} rows (non-terminal sagas silent past the threshold)"
    )
    disturbed = [
        n + 1
        for n, p in enumerate(d.passes)
        if p.wall >= CPU_MIN_WINDOW and p.other_cores > DISTURBED_CORES
    ]
    if disturbed:
        print(
            f"  warning: other programs used over {DISTURBED_CORES} cores during run(s) "
            f"{', '.join(map(str, disturbed))}"
        )
    print()
    print(
        f"{'first pass (median) / naive query':<46} {d.median / d.naive_seconds:7.2f} x  "
        "(for comparison)"
    )
    print(
        f"{'next pass / naive query':<46} {d.next_pass.wall / d.naive_seconds:7.2f} x  "
        "(for comparison)"
    )
    verdict = "PASS" if d.median <= BAR_PASS_S and d.exact else "FAIL"
    found = f"exactly the {lay.stuck:,} stuck" if d.exact else "NOT exactly the stuck ones"
    label = f"detector pass, median of {len(d.passes)}"
    print(f"{label:<46} {d.median:7.3f} s  (bar <= {BAR_PASS_S:g} s; found {found})  {verdict}")
    if d.profile:
        print("\ncProfile of one more first pass (cumulative):")
        print(d.profile)


# --- part 2: ingest with step statistics on and off ----------------------------------------


@dataclasses.dataclass
class IngestRun:
    stats: bool
    result: Any  # ingest.Result
    delta_rows: int  # StepStatDelta rows the phase added
    repeats: int = 0  # earlier attempts dropped: other programs used the CPU meanwhile


def run_ingest_part(args: argparse.Namespace) -> tuple[list[IngestRun], str]:
    _, pg_version, env, key = ingest.database_prepare(INGEST_DB)
    order = [True, False, False, True] * (args.rounds // 2) + [True, False] * (args.rounds % 2)
    runs: list[IngestRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        for n, stats in enumerate(order):
            for attempt in range(args.retries + 1):
                run = _ingest_phase(args, env, key, stats, Path(tmp, f"uvicorn-{n}-{attempt}.log"))
                run.repeats = attempt
                other = run.result.cpu["other"]
                if other <= DISTURBED_CORES or attempt == args.retries:
                    break
                print(f"  other programs used {other:.2f} cores meanwhile: again", flush=True)
            runs.append(run)
    for run in runs:
        if run.stats != (run.delta_rows > 0):
            raise BenchError(
                f"step stats {'on' if run.stats else 'off'}, yet the phase added "
                f"{run.delta_rows} StepStatDelta rows: the setting did not apply"
            )
    return runs, pg_version


def _ingest_phase(
    args: argparse.Namespace, env: dict[str, str], key: str, stats: bool, log: Path
) -> IngestRun:
    """One batch-ingest phase against a server started with step statistics on or off."""
    dsn = env["DATABASE_URL"]
    server_env = {**env, "SAGAADMIN_STEP_STATS": "1" if stats else "0"}
    before = _delta_rows(dsn)
    with ingest.server_running(server_env, args.workers, log) as (port, pgid):
        phase = ingest.batch_phase(
            f"batch ingest, step stats {'on' if stats else 'off'}",
            args.batch_clients,
            port,
            key,
            warmup=args.warmup,
            duration=args.duration,
            max_rate=INGEST_MAX_RATE,
        )
        result = ingest.run_server_phase(phase, dsn, pgid, log)
    ingest.server_log_check(log)
    return IngestRun(stats, result, _delta_rows(dsn) - before)


def _delta_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM tracking_stepstatdelta").fetchone()
    return row[0] if row else 0


def report_ingest(runs: list[IngestRun], args: argparse.Namespace, pg_version: str) -> None:
    print()
    order = ", ".join("on" if r.stats else "off" for r in runs)
    print(
        f"Saga Admin ingest with step-duration statistics on/off: {os.cpu_count()} cores, "
        f"PostgreSQL {pg_version}, uvicorn {args.workers} workers, {args.batch_clients} clients, "
        f"{args.duration:g} s per phase after {args.warmup:g} s warm-up; order {order}"
    )
    print()
    print(f"{ingest.RESULT_HEADER}  StepStatDelta rows")
    for r in runs:
        line, _, note = ingest.result_row(r.result).partition("\n")
        print(f"{line}{r.delta_rows:>11,}" + (f"\n{note}" if note else ""))
        if r.repeats:
            print(f"  note: run {r.repeats + 1} times (other programs used the CPU)")
    disturbed = [n + 1 for n, r in enumerate(runs) if r.result.cpu["other"] > DISTURBED_CORES]
    if disturbed:
        print(
            f"  warning: other programs used over {DISTURBED_CORES} cores during phase(s) "
            f"{', '.join(map(str, disturbed))}"
        )
    on = [r.result.rate for r in runs if r.stats]
    off = [r.result.rate for r in runs if not r.stats]
    print()
    for label, rates in (("step stats on", on), ("step stats off", off)):
        print(
            f"{label + ', mean':<46} {statistics.mean(rates):>9,.0f} events/s  "
            f"(phases {min(rates):,.0f} to {max(rates):,.0f})"
        )
    cost = {
        stats: statistics.mean(
            1e6 * (r.result.cpu["server"] + r.result.cpu["postgres"]) / r.result.rate
            for r in runs
            if r.stats == stats
        )
        for stats in (True, False)
    }
    print(
        f"{'server + PostgreSQL CPU per 1,000 events':<46} on {cost[True]:.1f} ms, "
        f"off {cost[False]:.1f} ms"
    )
    ratio = statistics.mean(on) / statistics.mean(off)
    verdict = "PASS" if ratio >= BAR_STATS_RATIO else "FAIL"
    print(
        f"{'ingest with step stats / without':<46} {ratio:9.3f}  "
        f"(bar >= {BAR_STATS_RATIO:.2f})  {verdict}"
    )


# --- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK[0]:,} sagas ({QUICK[1]:,} open), 5 s ingest phases",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help=f"measure the dataset an earlier run left in {DETECT_DB} (generate it if absent)",
    )
    p.add_argument("--sagas", type=int, default=None, help=f"sagas (default {FULL[0]:,})")
    p.add_argument("--open", type=int, default=None, help=f"non-terminal ones ({FULL[1]:,})")
    p.add_argument("--stuck", type=int, default=None, help=f"stuck ones among them ({FULL[2]:,})")
    p.add_argument(
        "--procs",
        type=int,
        default=int(env_num("BENCH_GEN_PROCS", 2)),
        help="generator processes",
    )
    p.add_argument(
        "--passes",
        type=int,
        default=int(env_num("BENCH_PASSES", 3)),
        help="first passes measured (each after a reset); the bar applies to their median",
    )
    p.add_argument("--profile", action="store_true", help="cProfile one more first pass")
    p.add_argument("--no-detect", action="store_true", help="skip part 1 (the detector pass)")
    p.add_argument("--no-ingest", action="store_true", help="skip part 2 (ingest on/off)")
    p.add_argument(
        "--rounds",
        type=int,
        default=int(env_num("BENCH_ROUNDS", 3)),
        help="ingest phases per setting (order on, off, off, on, ...)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=int(env_num("BENCH_RETRIES", 2)),
        help=f"times an ingest phase is run again when other programs used over "
        f"{DISTURBED_CORES} cores during it",
    )
    p.add_argument(
        "--workers", type=int, default=int(env_num("BENCH_WORKERS", 2)), help="uvicorn workers"
    )
    p.add_argument(
        "--duration", type=float, default=env_num("BENCH_DURATION", 20), help="s per phase"
    )
    p.add_argument(
        "--warmup", type=float, default=env_num("BENCH_WARMUP", 3), help="s before each window"
    )
    p.add_argument(
        "--batch-clients",
        type=int,
        default=int(env_num("BENCH_BATCH_CLIENTS", 4)),
        help="client processes",
    )
    args = p.parse_args()
    sizes = QUICK if args.quick else FULL
    args.sagas = args.sagas if args.sagas is not None else sizes[0]
    args.open = args.open if args.open is not None else sizes[1]
    args.stuck = args.stuck if args.stuck is not None else sizes[2]
    if not 0 < args.stuck <= args.open <= args.sagas:
        p.error("need 0 < --stuck <= --open <= --sagas")
    if args.passes < 1:
        p.error("--passes must be at least 1")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.quick:
        args.duration, args.warmup = 5.0, 1.0
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill too
    run_started = time.monotonic()
    detect: DetectOutcome | None = None
    if not args.no_detect:
        detect = run_detect_part(args)
        from django.db import connections

        connections.close_all()  # part 2 runs servers; this process keeps no connection open
    ingest_runs: tuple[list[IngestRun], str] | None = None
    if not args.no_ingest:
        ingest_runs = run_ingest_part(args)
    if detect is not None:
        report_detect(detect, server_version(f"{base_dsn()}/{DETECT_DB}"))
    if ingest_runs is not None:
        report_ingest(ingest_runs[0], args, ingest_runs[1])
    print(f"\nrun time {time.monotonic() - run_started:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\nbench/detect.py: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
