"""Ingest throughput of Saga Admin against raw PostgreSQL, measured in one run.

What it measures, on a fresh database (``sagaadmin_bench``, dropped and
recreated on every run) of the local PostgreSQL server:

* batch ingest: events/s accepted by ``POST /api/v1/events`` with 500-event
  ``{"events": [...]}`` batches, from concurrent keep-alive clients;
* single-event ingest: events/s with one event per request, each client
  reporting its own sagas (no lock contention between clients);
* raw PostgreSQL, on ``raw_events``: a copy of ``tracking_telemetryevent`` with
  the same columns, unique constraint and indexes (no foreign key), filled with
  rows of the same shape:
  COPY rows/s in 500-row chunks (the ceiling for batch ingest) and single-row
  INSERT commits/s at the single-event concurrency (the ceiling for one event
  per request), as /work/shared/peers/pg_limits.py measures them but with the
  product phases' clients: several COPY connections, and 16 connections
  committing side by side, where pg_limits.py commits on one connection (4,700-
  5,300 commits/s there on the 2-core machines, 10,000-12,500 here, PostgreSQL
  then flushing several commits' WAL at once: the stricter baseline);

in rounds (default 3: batch, single-event, COPY, single-row commits, then
again), and prints two ratios against the bars of the issue, each the median of
the rounds' ratios: batch events/s over COPY rows/s (>= 0.25) and single-event
events/s over single-row commits/s (>= 0.30).

How: the product is migrated and a service key created with ``manage.py``; the
server is started as production runs it (uvicorn, N workers, no access log).
Every saga is eight events (saga.started, started/succeeded for the steps
order, payment and stock, saga.completed). Clients are separate processes
(threads only for the single-event connections), each connection keep-alive,
every request (headers and body) encoded before the clock starts and sent
over a plain socket: the clients share the machine's cores with the server
and PostgreSQL, and ``http.client`` took three times the CPU per request
(~200 µs against ~70 µs in the single-event phase on 2 cores), which the
server then lacked. Each phase warms up, then
counts the work completed inside a fixed window; every response must be 200
with nothing rejected. CPU time of the server, PostgreSQL and the clients
during each window is read from /proc.

Usage: .venv/bin/python bench/ingest.py [--quick] [--workers N] [--duration S] ...
(``--help`` lists every option; each also reads a BENCH_* variable). The base
DSN comes from BENCH_PG (default postgresql://postgres@127.0.0.1:5432). The
server gets this process's environment plus DATABASE_URL, so product settings
such as DATABASE_CONN_MAX_AGE can be varied from the command line.
Exits 0 whether or not the bars pass (it is a measurement), 1 on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import math
import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
    tcp_peers,
)
from psycopg.types.json import Jsonb

BIN = Path(sys.executable).parent  # the venv this script runs in
HOST = "127.0.0.1"
DB_NAME = "sagaadmin_bench"
EVENTS_TABLE = "tracking_telemetryevent"
RAW_TABLE = "raw_events"
BATCH_SIZE = 500
SAGA_TYPE = "order_fulfillment"
STEPS = ("order", "payment", "stock")
BAR_BATCH, BAR_SINGLE = 0.25, 0.30
# Request bodies are pre-generated for up to these rates; a phase whose clients
# run out earlier is measured up to that moment (and says so).
MAX_BATCH_EVENTS_PER_S = 100_000  # per run; clients are not served evenly: room for 3x
MAX_SINGLE_EVENTS_PER_S = 6_000
# Raw phases cycle through a pool of rows, under a new service_id on every pass.
RAW_POOL_ROWS = 10_000
UNITS = {"batch": "events/s", "single": "events/s", "copy": "rows/s", "insert": "commits/s"}
# The columns ingest writes (tracking.ingest._COLUMNS), in the same order.
COLUMNS = (
    "service_id",
    "event_id",
    "protocol_version",
    "saga_id",
    "saga_type",
    "type",
    "step",
    "attempt",
    "occurred_at",
    "received_at",
    "sequence",
    "deadline",
    "idempotency_key",
    "message",
    "error",
    "attributes",
    "payload",
    "trace_id",
    "span_id",
    "content_hash",
)
_COLS = ", ".join(COLUMNS)
COPY_SQL = f"COPY {RAW_TABLE} ({_COLS}) FROM STDIN"
INSERT_SQL = f"INSERT INTO {RAW_TABLE} ({_COLS}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"


class Exhausted(Exception):
    """A client used up its pre-generated requests."""


# --- workload ------------------------------------------------------------------


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def saga_events(started: datetime) -> list[dict[str, Any]]:
    """The eight events of one successful saga, as a reporter sends them."""
    saga_id = f"order-{uuid.uuid4().hex}"
    attributes = {"order_id": f"ORD-{uuid.uuid4().int % 10**10:010d}"}
    kinds = [
        ("saga.started", ""),
        *((f"step.{phase}", step) for step in STEPS for phase in ("started", "succeeded")),
        ("saga.completed", ""),
    ]
    events = []
    for sequence, (kind, step) in enumerate(kinds):
        event: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "saga_id": saga_id,
            "type": kind,
            "occurred_at": _rfc3339(started + timedelta(milliseconds=40 * sequence)),
            "sequence": sequence,
            "attributes": attributes,
        }
        if kind == "saga.started":
            event["saga_type"] = SAGA_TYPE
        if step:
            event["step"] = step
        events.append(event)
    return events


def event_stream(count: int, span_start: float, span_seconds: float) -> Iterator[dict[str, Any]]:
    """``count`` events of consecutive sagas whose start times spread over the span.

    Timestamps follow the run (wall clock), so no saga looks clock-skewed.
    """
    sagas = math.ceil(count / 8)
    made = 0
    for i in range(sagas):
        started = datetime.fromtimestamp(span_start + span_seconds * i / sagas, UTC)
        for event in saga_events(started):
            if made == count:
                return
            made += 1
            yield event


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def raw_row(event: dict[str, Any], received_at: datetime) -> tuple[Any, ...]:
    """``event`` as the row ingest stores, without its leading service_id."""
    return (
        event["id"],
        1,
        event["saga_id"],
        event.get("saga_type", ""),
        event["type"],
        event.get("step", ""),
        1,
        datetime.fromisoformat(event["occurred_at"]),
        received_at,
        event["sequence"],
        None,
        "",
        None,
        None,
        Jsonb(event["attributes"]),
        None,
        "",
        "",
        hashlib.sha256(_encode(event)).hexdigest(),
    )


# --- client tasks (each runs in one thread of a client process) -----------------


class ConnectionSpread:
    """Gives each worker process of the server an even share of the clients' connections.

    A load balancer in front of the workers would spread the connections; the
    workers' shared listening socket does not: a new connection goes to
    whichever worker accepts first, and a burst of connections often all goes
    to one. Measured: the batch phase ran at 24,000 events/s when its 4
    connections all landed on one of 2 workers, 35,000-41,000 with both in use,
    and which of the two a run got was chance. So each client connects under a
    lock shared by the client processes, looks up in /proc which worker
    accepted, and connects again while that worker already has its share.
    """

    def __init__(self, ctx: Any, workers: list[int], connections: int) -> None:
        self.workers = workers
        self.share = math.ceil(connections / len(workers))
        self.lock = ctx.Lock()
        self.counts = ctx.Array("i", len(workers))

    def connect(self, port: int) -> socket.socket:
        """A connection to ``port`` held by a worker that has less than its share.

        Gives up (BenchError) after 30 s, or after 10 connections in a row that
        no known worker accepted within a second (a worker replaced by uvicorn).
        """
        deadline = time.monotonic() + 30
        unknown = 0
        with self.lock:
            while time.monotonic() < deadline and unknown < 10:
                sock = socket.create_connection((HOST, port), timeout=60)
                worker = self._accepted_by(port, sock.getsockname()[1])
                unknown = unknown + 1 if worker is None else 0
                if worker is not None and self.counts[worker] < self.share:
                    self.counts[worker] += 1
                    return sock
                sock.close()
        raise BenchError(
            f"could not give each of the server's {len(self.workers)} worker processes "
            f"{self.workers} its share of {self.share} connections"
        )

    def held(self, port: int) -> str:
        """How the connections to ``port`` are spread over the workers now, as a note."""
        counts = sorted(map(len, tcp_peers(self.workers, port).values()), reverse=True)
        return "connections per worker: " + ", ".join(map(str, counts))

    def _accepted_by(self, port: int, client_port: int) -> int | None:
        """The index of the worker that accepted the connection from ``client_port``."""
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            for pid, ports in tcp_peers(self.workers, port).items():
                if client_port in ports:
                    return self.workers.index(pid)
            time.sleep(0.001)
        return None


class PostTask:
    """POSTs pre-encoded bodies over one keep-alive connection.

    The requests are built whole before the clock starts and sent over a plain
    socket; the answer's status line and headers are parsed by hand (it must have
    a Content-Length). ``http.client`` costs about three times as much CPU per
    request (its header parsing goes through the email package), and on a small
    machine the clients share the cores with the server and PostgreSQL: the
    lighter the load generator, the less the bench measures itself.
    """

    path = "/api/v1/events"
    content_type = "application/json"

    def __init__(
        self,
        port: int,
        key: str,
        bodies: list[bytes],
        per_request: int,
        spread: ConnectionSpread | None = None,
    ) -> None:
        if spread is None:
            self.sock = socket.create_connection((HOST, port), timeout=60)
        else:
            self.sock = spread.connect(port)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: {self.content_type}\r\n"
        ).encode()
        self.requests = [b"%sContent-Length: %d\r\n\r\n%s" % (head, len(b), b) for b in bodies]
        self.per_request = per_request
        self.next = 0
        self.buffer = b""

    def step(self) -> int:
        if self.next == len(self.requests):
            raise Exhausted
        self.sock.sendall(self.requests[self.next])
        self.next += 1
        self.answer_check(*self._response())
        return self.per_request

    def answer_check(self, status: int, data: bytes) -> None:
        """Raise unless the answer says every event of the request was accepted."""
        if status != 200:
            raise BenchError(f"HTTP {status}: {data[:400]!r}")
        out = json.loads(data)
        if out["rejected"] or out["accepted"] != self.per_request:
            raise BenchError(
                f"expected {self.per_request} accepted, got accepted={out['accepted']} "
                f"duplicates={out['duplicates']} rejected={out['rejected']}: {data[:400]!r}"
            )

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError("the server closed the connection")
        self.buffer += chunk

    def _response(self) -> tuple[int, bytes]:
        """One answer: its status and body (the connection stays open)."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._recv()
        status_line, *lines = self.buffer[:end].decode("latin-1").split("\r\n")
        fields = dict(line.split(":", 1) for line in lines)
        length = next((v for k, v in fields.items() if k.lower() == "content-length"), None)
        if length is None:
            raise BenchError(f"an answer without Content-Length: {status_line} {fields}")
        stop = end + 4 + int(length)
        while len(self.buffer) < stop:
            self._recv()
        body, self.buffer = self.buffer[end + 4 : stop], self.buffer[stop:]
        return int(status_line.split(" ", 2)[1]), body


class RawTask:
    """COPY chunks or single-row INSERTs into raw_events over one autocommit connection.

    Cycles through its pool of rows; each pass uses a service_id of its own, so
    every row is new to the (service_id, event_id) unique index.
    """

    def __init__(self, dsn: str, rows: list[tuple[Any, ...]], chunk: int, task_id: int) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.cursor = self.conn.cursor()
        self.rows = rows
        self.chunk = chunk
        self.service_id = (task_id + 1) * 1_000_000
        self.pos = 0

    def step(self) -> int:
        if self.pos >= len(self.rows):
            self.pos, self.service_id = 0, self.service_id + 1
        rows = self.rows[self.pos : self.pos + self.chunk]
        self.pos += self.chunk
        if self.chunk == 1:
            self.cursor.execute(INSERT_SQL, (self.service_id, *rows[0]))
        else:
            with self.cursor.copy(COPY_SQL) as copy:
                for row in rows:
                    copy.write_row((self.service_id, *row))
        return len(rows)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One measured phase: what each client thread does, and how many there are."""

    label: str
    kind: str  # "batch", "single", "copy" or "insert"
    procs: int
    threads: int
    warmup: float
    duration: float
    target: str  # the server's port for HTTP phases, the DSN for raw ones
    key: str = ""
    events_per_thread: int = 0  # pre-generated, for HTTP phases
    span_start: float = 0.0  # wall-clock span the events' timestamps cover
    span_seconds: float = 0.0

    def make_task(self, task_id: int, spread: ConnectionSpread | None) -> PostTask | RawTask:
        if self.kind in ("batch", "single"):
            events = event_stream(self.events_per_thread, self.span_start, self.span_seconds)
            if self.kind == "single":
                bodies = [_encode(e) for e in events]
                return PostTask(int(self.target), self.key, bodies, 1, spread)
            chunk: list[dict[str, Any]] = []
            bodies = []
            for event in events:
                chunk.append(event)
                if len(chunk) == BATCH_SIZE:
                    bodies.append(_encode({"events": chunk}))
                    chunk = []
            return PostTask(int(self.target), self.key, bodies, BATCH_SIZE, spread)
        now = datetime.now(UTC)
        rows = [raw_row(e, now) for e in event_stream(RAW_POOL_ROWS, now.timestamp(), 60)]
        return RawTask(self.target, rows, BATCH_SIZE if self.kind == "copy" else 1, task_id)


def _drive(
    task: PostTask | RawTask, start: float, end: float, out: dict[str, Any], failed: Any
) -> None:
    """Run ``task`` until ``end``; record (completed_at, items, latency) from ``start`` on.

    Stops early when any client failed (``failed`` is set): one error voids the phase.
    """
    done: list[tuple[float, int, float]] = out["done"]
    while (began := time.monotonic()) < end and not failed.is_set():
        try:
            items = task.step()
        except Exhausted:
            out["exhausted"].append(began)
            return
        except Exception as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}")
            failed.set()
            return
        finished = time.monotonic()
        if finished >= start:
            done.append((finished, items, finished - began))


def _client(
    phase: Phase,
    index: int,
    spread: ConnectionSpread | None,
    ready: Any,
    go: Any,
    t0: Any,
    failed: Any,
    results: Any,
) -> None:
    """A client process: prepare its threads' tasks, wait for the start, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    out: dict[str, Any] = {"done": [], "errors": [], "exhausted": []}
    try:
        tasks = [phase.make_task(index * phase.threads + i, spread) for i in range(phase.threads)]
    except Exception as exc:
        out["errors"].append(f"setup: {type(exc).__name__}: {exc}")
        failed.set()
        tasks = []
    ready.put(index)
    go.wait()
    start = t0.value + phase.warmup
    end = start + phase.duration
    threads = [
        threading.Thread(target=_drive, args=(task, start, end, out, failed), daemon=True)
        for task in tasks
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(out)


# --- measuring -------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    phase: Phase
    rate: float  # items per second inside the window
    p50_ms: float
    p99_ms: float
    cpu: dict[str, float]  # cores used during the window, by party
    note: str = ""


def _cpu_sample(server_pgid: int | None, clients: set[int]) -> dict[str, float]:
    totals = {"server": 0.0, "postgres": 0.0, "clients": 0.0}
    if not Path("/proc/stat").exists():
        return totals
    for pid, proc in process_cpu().items():
        name, pgrp, seconds = proc.name, proc.pgrp, proc.with_children
        if server_pgid is not None and pgrp == server_pgid:
            totals["server"] += seconds
        elif name == "postgres" or name.startswith("postgres:"):
            totals["postgres"] += seconds
        elif pid in clients:
            totals["clients"] += seconds
    totals["machine"] = busy_seconds()
    return totals


def run_phase(phase: Phase, server_pgid: int | None = None) -> Result:
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go, failed, t0 = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
    spread = None
    if server_pgid is not None and phase.kind not in ("copy", "insert"):
        spread = ConnectionSpread(ctx, server_workers(server_pgid), phase.procs * phase.threads)
    procs = [
        ctx.Process(
            target=_client,
            args=(phase, i, spread, ready, go, t0, failed, results),
            daemon=True,
        )
        for i in range(phase.procs)
    ]
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            try:
                ready.get(timeout=300)
            except queue.Empty:
                raise BenchError(f"{phase.label}: the clients were not ready in 300 s") from None
        t0.value = time.monotonic() + 0.1
        go.set()
        start = t0.value + phase.warmup
        end = start + phase.duration
        pids = {p.pid for p in procs if p.pid is not None}
        failed.wait(max(0.0, start - time.monotonic()))
        before = _cpu_sample(server_pgid, pids)
        spread_note = spread.held(int(phase.target)) if spread is not None else ""
        failed.wait(max(0.0, end - time.monotonic()))
        after = _cpu_sample(server_pgid, pids)
        outs = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    errors = [e for out in outs for e in out["errors"]]
    if errors:
        shown = "\n  ".join(sorted(set(errors))[:5])
        raise BenchError(f"{phase.label}: {len(errors)} client(s) failed:\n  {shown}")
    notes = [spread_note] if spread_note else []
    exhausted = [t for out in outs for t in out["exhausted"]]
    if exhausted and min(exhausted) < end:
        end = min(exhausted)
        note = f"clients ran out of pre-generated requests after {end - start:.1f} s"
        notes.append(note)
        if end - start < phase.duration / 2:
            raise BenchError(f"{phase.label}: {note}; raise the MAX_*_EVENTS_PER_S caps")
    done = [d for out in outs for d in out["done"] if start <= d[0] <= end]
    if not done:
        raise BenchError(f"{phase.label}: no request completed inside the window")
    latencies = sorted(d[2] for d in done)
    cpu = {k: (after[k] - before[k]) / phase.duration for k in after}
    machine = cpu.pop("machine", 0.0)
    cpu["other"] = max(0.0, machine - sum(cpu.values()))  # the kernel, other programs
    return Result(
        phase,
        sum(d[1] for d in done) / (end - start),
        1000 * latencies[len(latencies) // 2],
        1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        cpu,
        "; ".join(notes),
    )


# --- database and server ---------------------------------------------------------


def _index_shapes(conn: psycopg.Connection, table: str) -> list[str]:
    """Index and constraint definitions of ``table``, without names or table name."""
    rows = conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = %s "
        "UNION ALL SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype <> 'f'",
        (table, table),
    ).fetchall()
    index = re.compile(r"CREATE (UNIQUE )?INDEX \S+ ON \S+ USING btree ")
    return sorted(index.sub(lambda m: f"{(m[1] or '').lower()}index ", r[0]) for r in rows)


def raw_table_create(dsn: str) -> list[str]:
    """raw_events: LIKE tracking_telemetryevent INCLUDING ALL; checks the indexes came along."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {RAW_TABLE} (LIKE {EVENTS_TABLE} INCLUDING ALL)")
        product, raw = _index_shapes(conn, EVENTS_TABLE), _index_shapes(conn, RAW_TABLE)
    if product != raw:
        raise BenchError(f"{RAW_TABLE} differs from {EVENTS_TABLE}:\n{raw}\n{product}")
    return raw


def checkpoint(dsn: str) -> None:
    """Flush dirty pages so one phase's writes do not slow the next one down."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_running(env: dict[str, str], workers: int, log: Path) -> Iterator[tuple[int, int]]:
    """Start uvicorn as production does; yield (port, process group); always stop it."""
    port = _free_port()
    command = [
        str(BIN / "uvicorn"),
        "sagaadmin.asgi:application",
        *("--host", HOST, "--port", str(port), "--workers", str(workers)),
        *("--no-access-log", "--log-level", "warning"),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_ready(proc, port, log, workers)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_workers(pgid: int) -> list[int]:
    """The processes serving requests of the uvicorn server started in process group
    ``pgid``: its worker processes, or the server itself when it runs one worker."""
    workers = []
    for pid, proc in process_cpu().items():
        if proc.pgrp == pgid and pid != pgid:
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(pid)
    return sorted(workers) or [pgid]


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, workers: int) -> None:
    """Return once each of the ``workers`` processes has answered GET /readyz (a
    worker still starting accepts no connection: see :class:`ConnectionSpread`)."""
    deadline = time.monotonic() + 60
    answered: set[int] = set()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited ({proc.returncode}):\n{_tail(log)}")
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200 and conn.sock is not None:
                mine = conn.sock.getsockname()[1]
                peers = tcp_peers(server_workers(proc.pid), port)
                answered.update(pid for pid, ports in peers.items() if mine in ports)
                if len(answered) >= workers:
                    return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise BenchError(
        f"{len(answered)} of {workers} workers answered GET /readyz within 60 s:\n{_tail(log)}"
    )


def _tail(log: Path, lines: int = 15) -> str:
    """The log's last distinct messages (timestamps dropped), each with its count."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        message = re.sub(r"^\d{4}-\d\d-\d\d [\d:,.]+ ", "", line)
        counts[message] = counts.pop(message, 0) + 1  # re-inserted: ordered by last use
    return "\n".join(f"  {n:>5} x {m}" for m, n in list(counts.items())[-lines:])


# --- main ------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    p.add_argument(
        "--workers", type=int, default=int(env_num("BENCH_WORKERS", 2)), help="uvicorn workers"
    )
    p.add_argument(
        "--duration", type=float, default=env_num("BENCH_DURATION", 15), help="s per phase"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=int(env_num("BENCH_ROUNDS", 3)),
        help="rounds of the four phases; each ratio is the median of the rounds' ratios",
    )
    p.add_argument(
        "--warmup", type=float, default=env_num("BENCH_WARMUP", 3), help="s before each window"
    )
    p.add_argument(
        "--batch-clients",
        type=int,
        default=int(env_num("BENCH_BATCH_CLIENTS", 4)),
        help="client processes in batch mode (and COPY connections)",
    )
    p.add_argument(
        "--single-procs",
        type=int,
        default=int(env_num("BENCH_SINGLE_PROCS", 4)),
        help="client processes in single-event mode (and for raw INSERTs)",
    )
    p.add_argument(
        "--single-threads",
        type=int,
        default=int(env_num("BENCH_SINGLE_THREADS", 4)),
        help="connections per single-event client process",
    )
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.rounds = 3.0, 1.0, 1
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


RESULT_HEADER = (
    f"{'phase':<34}{'clients':>9}{'rate':>17}{'p50 ms':>9}{'p99 ms':>9}"
    "  CPU cores: server postgres  clients    other"
)


def result_row(r: Result) -> str:
    """One measured phase as a line under ``RESULT_HEADER`` (and its note, if any)."""
    unit = UNITS[r.phase.kind]
    clients = f"{r.phase.procs}x{r.phase.threads}" if r.phase.threads > 1 else r.phase.procs
    cpu = "".join(f"{r.cpu[k]:>9.2f}" for k in ("server", "postgres", "clients", "other"))
    line = (
        f"{r.phase.label:<34}{clients!s:>9}{r.rate:>8,.0f} {unit:<9}{r.p50_ms:>8.1f}"
        f"{r.p99_ms:>9.1f}  {cpu}"
    )
    return f"{line}\n  note: {r.note}" if r.note else line


def report(
    results: list[Result], args: argparse.Namespace, pg_version: str, indexes: list[str]
) -> None:
    print()
    print(
        f"Saga Admin ingest benchmark: {os.cpu_count()} cores, PostgreSQL {pg_version}, "
        f"uvicorn {args.workers} workers, {args.rounds} round(s) of four "
        f"{args.duration:g} s phases after {args.warmup:g} s warm-up each"
    )
    print(f"{RAW_TABLE}: the columns of {EVENTS_TABLE} and the same {'; '.join(indexes)}")
    print()
    print(RESULT_HEADER)
    per_round = 4
    for n, r in enumerate(results):
        if n % per_round == 0 and args.rounds > 1:
            print(f"round {n // per_round + 1}")
        print(result_row(r))
    rates: dict[str, list[float]] = {}
    for r in results:
        rates.setdefault(r.phase.kind, []).append(r.rate)
    print()
    if args.rounds > 1:
        print(
            "medians: "
            + ", ".join(
                f"{kind} {statistics.median(values):,.0f} {UNITS[kind]} ({len(values)} phases)"
                for kind, values in rates.items()
            )
        )
    for label, num, den, bar in (
        ("batch ingest / raw COPY", "batch", "copy", BAR_BATCH),
        ("single-event ingest / raw single-row commits", "single", "insert", BAR_SINGLE),
    ):
        pairs = list(zip(rates.get(num, []), rates.get(den, []), strict=False))
        if not pairs:
            print(f"{label:<46} not measured")
            continue
        # each round's ratio: its two phases ran minutes apart on the same machine state
        ratios = [a / b for a, b in pairs]
        ratio = statistics.median(ratios)
        verdict = "PASS" if ratio >= bar else "FAIL"
        if len(ratios) == 1:
            detail = f"needs >= {bar * pairs[0][1]:,.0f} events/s"
        else:
            detail = "median of the rounds' " + ", ".join(f"{r:.3f}" for r in ratios)
        print(f"{label:<46} {ratio:5.3f}  (bar >= {bar:.2f}; {detail})  {verdict}")


def database_prepare(name: str) -> tuple[str, str, dict[str, str], str]:
    """Recreate and migrate a bench database and create a service key.

    Returns its DSN, the server version, the environment to start the server
    with (this process's, plus DATABASE_URL) and the key.
    """
    dsn, pg_version = database_recreate(base_dsn(), name)
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
        "DEBUG": "0",
    }
    print(f"database {name} recreated; migrating", flush=True)
    manage(env, "migrate", "--noinput", "-v", "0")
    key = manage(env, "create_service_key", "bench", "--quiet").strip()
    return dsn, pg_version, env, key


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill too
    dsn, pg_version, env, key = database_prepare(DB_NAME)
    indexes = raw_table_create(dsn)
    results: list[Result] = []
    try:
        run_rounds(args, env, key, results)
    finally:  # what was measured, also when a phase failed
        if results:
            report(results, args, pg_version, indexes)
    return 0


def run_rounds(
    args: argparse.Namespace, env: dict[str, str], key: str, results: list[Result]
) -> None:
    """Each round: the two server phases, then the two raw PostgreSQL phases.

    The server stays up (idle during the raw phases). Rounds make the ratios
    robust against the machine drifting: on the 2-core machines identical
    phases moved by 10-30 % between runs, and both sides slow down as their
    tables grow from round to round, so each round's ratio pairs phases run
    a minute apart, and the median of the rounds' ratios is compared.
    """
    dsn = env["DATABASE_URL"]
    common = {"warmup": args.warmup, "duration": args.duration}
    span = args.warmup + args.duration
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        log = Path(tmp, "uvicorn.log")
        with server_running(env, args.workers, log) as (port, pgid):
            print(f"server up on port {port} with {args.workers} workers", flush=True)
            server_phases = (
                batch_phase(
                    "batch ingest (500 events/request)", args.batch_clients, port, key, **common
                ),
                Phase(
                    "single-event ingest",
                    "single",
                    args.single_procs,
                    args.single_threads,
                    target=str(port),
                    key=key,
                    events_per_thread=math.ceil(
                        MAX_SINGLE_EVENTS_PER_S * span / args.single_procs / args.single_threads
                    ),
                    **common,
                ),
            )
            raw_phases = (
                Phase(
                    "raw COPY (500-row chunks)", "copy", args.batch_clients, 1, target=dsn, **common
                ),
                Phase(
                    "raw single-row INSERT commits",
                    "insert",
                    args.single_procs,
                    args.single_threads,
                    target=dsn,
                    **common,
                ),
            )
            for n in range(1, args.rounds + 1):
                if args.rounds > 1:
                    print(f"round {n} of {args.rounds}", flush=True)
                for phase in server_phases:
                    results.append(run_server_phase(phase, dsn, pgid, log))
                for phase in raw_phases:
                    checkpoint(dsn)
                    print(f"running {phase.label} ...", flush=True)
                    results.append(run_phase(phase))
        server_log_check(log)


def batch_phase(
    label: str,
    clients: int,
    port: int,
    key: str,
    *,
    warmup: float,
    duration: float,
    max_rate: int = MAX_BATCH_EVENTS_PER_S,
) -> Phase:
    """Batch ingest: ``clients`` processes POSTing 500-event batches to the server on ``port``.

    Each client pre-generates its share of ``max_rate`` events/s for the phase.
    """
    span = warmup + duration
    return Phase(
        label,
        "batch",
        clients,
        1,
        warmup=warmup,
        duration=duration,
        target=str(port),
        key=key,
        events_per_thread=BATCH_SIZE * math.ceil(max_rate * span / clients / BATCH_SIZE),
    )


def run_server_phase(phase: Phase, dsn: str, pgid: int, log: Path) -> Result:
    """Measure one phase against the running server (after a checkpoint)."""
    checkpoint(dsn)
    # Timestamps cover the phase, starting after the clients prepared.
    phase = dataclasses.replace(
        phase, span_start=time.time() + 5, span_seconds=phase.warmup + phase.duration
    )
    print(f"running {phase.label} ...", flush=True)
    try:
        return run_phase(phase, pgid)
    except BenchError as exc:
        raise BenchError(f"{exc}\nserver log (tail):\n{_tail(log)}") from None


def server_log_check(log: Path) -> None:
    if "Traceback" in log.read_text(errors="replace"):
        raise BenchError(f"the server logged errors:\n{_tail(log)}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\nbench/ingest.py: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
