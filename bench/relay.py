"""Outbox relay throughput and latency against its raw parts and a peer, measured in one run.

What it measures, on a fresh database (``sagaadmin_relaybench``, dropped and
recreated on every run) of the local PostgreSQL server and the local RabbitMQ:

Every throughput phase that reads the outbox starts from the same state: the
table truncated, N messages (default 200,000; ``--quick`` 20,000) loaded by
COPY as if published by many past transactions (available now, pending; the
columns are taken from the migrated table), then ``VACUUM (ANALYZE)`` and
``CHECKPOINT``. Each message has the topic ``bench.relay`` (one durable topic
exchange), one of 1,000 keys drawn at random (fixed seed), the type
``order.shipped`` (the routing key), a canonical JSON payload of ~80 bytes
(``outbox.api.encode_payload``) and a ``traceparent`` header. A durable queue
bound to the exchange with ``#`` receives every message, so the broker routes
and stores each one (persistent messages: confirmed once written to disk); its
depth is checked after each broker phase, then it is purged.

* relay: the product's ``Relay(RabbitMQTransport).run()`` -- what ``manage.py
  run_relay`` runs: ``OUTBOX_RELAY_LOOPS`` claim loops side by side (2) -- in
  this process after ``django.setup()`` with the command's settings
  (DATABASE_URL, the connection pool, OUTBOX_BATCH_SIZE), timed from the start
  to the commit that published the N-th message (the bench's own objects are
  frozen out of the garbage collector first, so the relay does not pay for
  them). Shown beside it, not counted: ``Relay.drain()``, the one loop of
  ``run_relay --once``.
  Afterwards every row must be ``published`` and the queue must hold N
  messages, or the run fails.
* raw broker: the same client path as the transport (aiormq's ``basic_publish``
  on an aio-pika channel, not waiting for each frame's write), the same N
  messages (bodies, message ids, headers and properties as the transport
  builds them), publisher confirms, in batches of the relay's batch size, each batch pipelined with
  ``asyncio.gather`` and awaited before the next, as the transport does; no
  database, no thread hop.
* raw database: the relay's own claim statement (``outbox.relay._CLAIM_POSTGRES``,
  imported, with the parameters the relay binds) and an UPDATE marking the
  claimed rows published, one transaction per batch, through one psycopg
  connection; no broker, no Django.
* two rows that locate the product's own overhead (no bar): the same Relay with
  a transport that confirms at once (the product's database side), and the
  RabbitMQTransport alone, fed the N messages in pre-built batches (its
  broker side).
* peer: django-outbox-pattern, with the script ``/work/shared/peers/outbox_peer/bench.py``
  in its own virtualenv (``var/peer-venv``: created with this interpreter and
  pip-installed when missing, never a project dependency), relaying over STOMP
  (``rabbitmq-plugins enable rabbitmq_stomp`` is run first; when it fails the
  peer ratio is skipped), on its own database (``sagaadmin_relaybench_peer``).
  The script writes M rows, one transaction each, then times its relay loop
  until every row is published. M defaults to 20,000 (``--peer-messages``):
  its writes run at ~500/s and its relay handles one row at a time, so 200,000
  would take ~10 minutes for the same per-message rate. Its messages go to
  ``amq.topic`` with no queue bound and no publisher confirms: less broker work
  than the relay does here, so the ratio favours the peer.
* latency at half load: ``manage.py run_relay`` (the real command, in a
  subprocess, woken by LISTEN/NOTIFY) runs on an emptied table while writer
  processes call ``outbox.publish()`` in their own transactions (K messages
  per transaction, on random keys taken in sorted order, as publish() asks;
  K is chosen to keep the writers under 200
  commits/s unless ``--per-tx`` is given) at half the relay rate measured
  above, paced to a fixed schedule, for a warm-up and then a measured window.
  The writers share the machine with the relay, PostgreSQL and RabbitMQ: when
  they cannot keep up, the achieved rate is printed and flagged. For every
  message committed inside the window:

  - commit time: the wall clock right after the writer's ``transaction.atomic()``
    block returned (the commit acknowledged by PostgreSQL);
  - confirm time: the row's ``published_at``, which the relay stamps
    (``timezone.now()``) right after the broker confirmed the whole batch and
    before it commits the mark: so commit-to-confirm covers the NOTIFY wake-up,
    the claim, building and sending the batch and the broker's confirms
    (fsync included);
  - delivery time: when a consumer on the bound queue (in this process)
    received the message (AMQP ``message_id`` = the outbox id).

  Reported: p50/p95/max of confirm - commit (the bar) and of delivery -
  commit. Every message written must end up published and delivered, or the
  run fails.

Then the ratios and bars of the issue: relay >= 0.5 x the slower of the two raw
rates; relay >= 5 x the peer's relay rate; commit-to-confirm p95 <= 100 ms at
half load. CPU cores used during each phase are read from /proc: the relaying
process (this one, or ``run_relay``), PostgreSQL, RabbitMQ (beam.smp) and the
rest of the machine, so a disturbed run is visible.

Usage: .venv/bin/python bench/relay.py [--quick] [--messages N] [--peer-messages M] ...
(``--help`` lists every option; each also reads a BENCH_* variable). The base
DSN comes from BENCH_PG (default postgresql://postgres@127.0.0.1:5432), the
broker from BENCH_AMQP (default amqp://guest:guest@127.0.0.1:5672/).
Exits 0 whether or not the bars pass (it is a measurement), 1 on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any, cast
from urllib.parse import urlsplit

import aio_pika
import aiormq
import psycopg
from common import ROOT, BenchError, base_dsn, database_recreate, env_num, manage, process_cpu

DB_NAME = "sagaadmin_relaybench"
PEER_DB = "sagaadmin_relaybench_peer"
SETTINGS = "sagaadmin.settings.base"
TOPIC = "bench.relay"
QUEUE = "bench.relay.all"
TYPE = "order.shipped"
KEYS = 1_000
SEED = 20_260_126
TABLE = "outbox_outboxmessage"
FULL_MESSAGES, QUICK_MESSAGES = 200_000, 20_000
FULL_PEER, QUICK_PEER = 20_000, 5_000
BAR_RAW, BAR_PEER, BAR_P95_MS = 0.5, 5.0, 100.0
DISTURBED_CORES = 0.25  # other programs' CPU above which a phase is flagged
MAX_COMMITS_PER_S = 200  # writers' transactions/s when --per-tx is automatic
PEER_DIR = ROOT.parent / "shared" / "peers" / "outbox_peer"
PEER_VENV = ROOT / "var" / "peer-venv"
PEER_PACKAGES = ("django-outbox-pattern", "psycopg[binary]")
STOMP_PORT = 61613
MARK_SQL = (
    f"UPDATE {TABLE} SET status = 'published', published_at = %(now)s, last_error = '' "
    "WHERE seq = ANY(%(seqs)s)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    id: uuid.UUID
    key: str
    payload: str  # canonical JSON, as publish() stores it
    headers: dict[str, str]


@dataclasses.dataclass
class Result:
    label: str
    kind: str
    messages: int
    seconds: float
    batch_ms: list[float] = dataclasses.field(default_factory=list)  # per batch, in order
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)  # cores, by party
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


@dataclasses.dataclass
class Latency:
    target_rate: float
    rate: float  # messages/s committed inside the window
    commits_rate: float
    writers: int
    per_tx: int
    window: float
    confirm_ms: list[float]  # sorted
    delivery_ms: list[float]  # sorted
    duplicates: int
    cpu: dict[str, float]
    note: str = ""


@dataclasses.dataclass
class Run:
    messages: int
    batch_size: int
    pg_version: str
    broker_version: str
    results: dict[str, Result] = dataclasses.field(default_factory=dict)
    latency: Latency | None = None
    peer_skipped: str = ""


# --- the workload -----------------------------------------------------------------


def make_messages(n: int) -> list[Message]:
    """``n`` messages in publication order (time-ordered ids, like publish())."""
    from outbox.api import encode_payload
    from outbox.ids import uuid7

    rng = Random(SEED)
    out = []
    for i in range(n):
        payload = {
            "order_id": 10_000_000 + i,
            "status": "shipped",
            "carrier": ("dhl", "ups", "fedex", "post")[rng.randrange(4)],
            "parcels": rng.randrange(1, 4),
        }
        out.append(
            Message(
                id=uuid7(),
                key=f"order-{rng.randrange(KEYS)}",
                payload=encode_payload(payload),
                headers={
                    "traceparent": f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"
                },
            )
        )
    return out


def preload(dsn: str, messages: Sequence[Message]) -> None:
    """Empty the outbox, COPY the messages in as pending, vacuum, analyze, checkpoint."""
    past = datetime.now(UTC) - timedelta(seconds=5)
    row: dict[str, Any] = {  # the columns publish() fills, for a message of the past
        "aggregatetype": TOPIC,
        "type": TYPE,
        "version": 1,
        "created_at": past,
        "available_at": past,
        "attempts": 0,
        "last_error": "",
        "published_at": None,
        "status": "pending",
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        present = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                (TABLE,),
            )
        }
        fixed = [c for c in row if c in present]
        columns = ["id", "aggregateid", "payload", "headers", *fixed]
        constant = [row[c] for c in fixed]
        conn.execute(f"TRUNCATE {TABLE}")
        copy_sql = f"COPY {TABLE} ({', '.join(columns)}) FROM STDIN"
        with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
            for m in messages:
                copy.write_row((m.id, m.key, m.payload, json.dumps(m.headers), *constant))
        conn.execute(f"VACUUM (ANALYZE) {TABLE}")
        conn.execute("CHECKPOINT")


def status_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(f"SELECT status, count(*) FROM {TABLE} GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


def check_all_published(dsn: str, expected: int, label: str) -> None:
    counts = status_counts(dsn)
    if counts.get("published", 0) != expected or sum(counts.values()) != expected:
        raise BenchError(f"{label}: expected {expected:,} rows published, found {counts}")


# --- CPU accounting ---------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values[:3]) + sum(values[5:])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU cores used between start and stop by named pid sets, PostgreSQL, RabbitMQ, the rest.

    "other" is the machine's busy time minus all of those (the kernel, other
    programs); when it is high the run was disturbed, and ``stop`` names the
    processes that took it.
    """

    def __init__(self, parties: dict[str, set[int]]) -> None:
        self.parties = parties
        self.began = time.perf_counter()
        self.before = self._sample()

    def _party(self, pid: int, name: str) -> str:
        for party, pids in self.parties.items():
            if pid in pids:
                return party
        if name == "postgres" or name.startswith("postgres:"):
            return "postgres"
        if name in ("beam.smp", "erl_child_setup", "epmd", "inet_gethost"):
            return "rabbitmq"
        return ""

    def _sample(self) -> tuple[dict[str, float], dict[int, tuple[str, float]]]:
        totals = dict.fromkeys([*self.parties, "postgres", "rabbitmq", "machine"], 0.0)
        others: dict[int, tuple[str, float]] = {}
        if not Path("/proc/stat").exists():
            return totals, others
        for pid, proc in process_cpu().items():
            name, own, with_children = proc.name, proc.own, proc.with_children
            if party := self._party(pid, name):
                totals[party] += with_children
            else:
                others[pid] = (name, own)
        totals["machine"] = _busy_seconds()
        return totals, others

    def stop(self) -> tuple[dict[str, float], str]:
        """Cores by party, and a note naming the processes behind a high "other"."""
        seconds = time.perf_counter() - self.began
        (after, others), (before, others_before) = self._sample(), self.before
        if seconds <= 0 or not after["machine"]:
            return {}, ""
        cores = {k: (after[k] - before[k]) / seconds for k in after}
        machine = cores.pop("machine")
        cores["other"] = max(0.0, machine - sum(cores.values()))
        if cores["other"] < DISTURBED_CORES:
            return cores, ""
        used = sorted(
            (
                ((sec - others_before[pid][1]) / seconds, pid, name)
                for pid, (name, sec) in others.items()
                if pid in others_before
            ),
            reverse=True,
        )
        named = ", ".join(
            f"{_cmdline(pid, name)} {c:.2f}" for c, pid, name in used[:3] if c >= 0.05
        )
        return cores, f"disturbed: other processes used {cores['other']:.2f} cores ({named or '?'})"


def _cmdline(pid: int, name: str) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    text = " ".join(a.decode(errors="replace") for a in args if a)
    return (text[:60] + "...") if len(text) > 60 else (text or name)


def measured(
    label: str, kind: str, work: Callable[[], tuple[int, list[float]]], parties: dict[str, set[int]]
) -> Result:
    """Run ``work`` (returns messages done and per-batch seconds) and time it."""
    print(f"running {label} ...", flush=True)
    meter = CpuMeter(parties)
    began = time.perf_counter()
    count, batches = work()
    seconds = time.perf_counter() - began
    # a work that knows when its last message was done (RelayRun): not the wait after it
    seconds = getattr(work, "done_after", None) or seconds
    cpu, note = meter.stop()
    return Result(label, kind, count, seconds, [1000 * b for b in batches], cpu, note)


# --- RabbitMQ ---------------------------------------------------------------------


async def _declare(url: str, purge: bool = True) -> str:
    """The exchange, the bound queue (purged); returns the broker's version."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(TOPIC, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(QUEUE, durable=True)
        await queue.bind(exchange, routing_key="#")
        if purge:
            await queue.purge()
        props: Any = getattr(connection.transport, "connection", None)
        server = getattr(props, "server_properties", {}) or {}
        version = server.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)


async def _queue_depth(url: str) -> int:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, durable=True, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def _broker_cleanup(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(QUEUE)
        await channel.exchange_delete(TOPIC)


def check_queue(url: str, expected: int, label: str) -> None:
    """The bound queue holds ``expected`` messages (waits briefly), then purge it."""
    deadline = time.monotonic() + 10
    while (depth := asyncio.run(_queue_depth(url))) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    if depth != expected:
        raise BenchError(f"{label}: the bound queue holds {depth:,} messages, not {expected:,}")
    asyncio.run(_declare(url))  # purge


async def _raw_broker(url: str, messages: Sequence[Message], batch: int) -> list[float]:
    """The transport's client path (aiormq's basic_publish on aio-pika's channel, no
    wait for each frame's write, the batch's confirms awaited together, the transport's
    own properties), no database."""
    from outbox.transports.rabbitmq import amqp_properties

    outgoing = outgoing_messages(messages)
    connection = await aio_pika.connect(url, timeout=10)
    times = []
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_exchange(TOPIC, aio_pika.ExchangeType.TOPIC, durable=True)
        amqp = cast(aiormq.Channel, await channel.get_underlay_channel())
        for start in range(0, len(messages), batch):
            began = time.perf_counter()
            sends = [
                amqp.basic_publish(
                    m.payload,
                    exchange=TOPIC,
                    routing_key=TYPE,
                    properties=amqp_properties(m),
                    mandatory=False,
                    timeout=30,
                    wait=False,
                )
                for m in outgoing[start : start + batch]
            ]
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if errors:
                raise BenchError(f"raw broker: {len(errors)} not confirmed: {errors[0]!r}")
            times.append(time.perf_counter() - began)
    return times


def raw_broker(url: str, messages: Sequence[Message], batch: int) -> tuple[int, list[float]]:
    return len(messages), asyncio.run(_raw_broker(url, messages, batch))


# --- the product, in this process -------------------------------------------------


class NullTransport:
    """Confirms every message at once: the relay's database side alone."""

    def publish(self, messages: Sequence[Any]) -> list[BaseException | None]:
        return [None] * len(messages)

    def close(self) -> None:
        pass


def relay_drain(transport: Any, label: str) -> tuple[int, list[float]]:
    """``Relay.drain()`` as ``run_relay --once`` runs it, each batch timed.

    The database connection stays open (the caller closes it after the phase's
    CPU was read).
    """
    from outbox.relay import BatchResult, Relay

    times: list[float] = []

    class TimedRelay(Relay):
        def run_once(self) -> BatchResult:
            began = time.perf_counter()
            try:
                return super().run_once()
            finally:
                times.append(time.perf_counter() - began)

    try:
        result = TimedRelay(transport).drain()
    finally:
        transport.close()
    return all_published(result, label), times[:-1]  # the last claim found nothing


def all_published(result: Any, label: str) -> int:
    """How many messages a relay phase published; BenchError if any was not."""
    if result.retried or result.dead or result.skipped:
        raise BenchError(
            f"{label}: retried {result.retried}, dead {result.dead}, skipped {result.skipped}"
        )
    return int(result.published)


class RelayRun:
    """``Relay.run()`` as ``manage.py run_relay`` runs it (``OUTBOX_RELAY_LOOPS`` claim
    loops side by side), stopped once ``total`` messages are published; each batch
    timed. ``done_after``: seconds from the start to the last message's confirm."""

    def __init__(self, transport: Any, label: str, total: int) -> None:
        self.transport, self.label, self.total = transport, label, total
        self.done_after: float | None = None

    def __call__(self) -> tuple[int, list[float]]:
        from outbox.relay import BatchResult, Relay

        times: list[float] = []
        totals = BatchResult()
        lock = threading.Lock()
        stop = threading.Event()
        began = time.perf_counter()
        run = self

        class TimedRelay(Relay):
            def run_once(self) -> BatchResult:
                batch_began = time.perf_counter()
                result = super().run_once()
                with lock:
                    if result.claimed:
                        times.append(time.perf_counter() - batch_began)
                    totals.add(result)
                    if totals.published >= run.total and not stop.is_set():
                        run.done_after = time.perf_counter() - began
                        stop.set()
                return result

        try:
            TimedRelay(self.transport).run(stop)
        finally:
            self.transport.close()
        return all_published(totals, self.label), times


def outgoing_messages(messages: Sequence[Message]) -> list[Any]:
    """The messages as the relay hands them to the transport (``Outgoing``)."""
    from outbox.transports.base import Outgoing

    return [
        Outgoing(m.id, TOPIC, m.key, TYPE, 1, m.payload.encode(), dict(m.headers)) for m in messages
    ]


def transport_alone(url: str, messages: Sequence[Message], batch: int) -> tuple[int, list[float]]:
    from outbox.transports.rabbitmq import RabbitMQTransport

    outgoing = outgoing_messages(messages)
    batches = [outgoing[start : start + batch] for start in range(0, len(outgoing), batch)]
    transport = RabbitMQTransport(url)
    times = []
    try:
        for chunk in batches:
            began = time.perf_counter()
            results = transport.publish(chunk)
            times.append(time.perf_counter() - began)
            errors = [r for r in results if r is not None]
            if errors:
                raise BenchError(f"transport alone: {len(errors)} failed: {errors[0]!r}")
    finally:
        transport.close()
    return len(messages), times


def raw_db(conn: psycopg.Connection[Any], batch: int) -> tuple[int, list[float]]:
    """The relay's claim statement and a mark, one transaction per batch, no broker.

    ``conn`` (autocommit) stays open after the phase, so the CPU its backend
    used is still counted when the phase's CPU is read.
    """
    from outbox import relay

    params: dict[str, Any] = {  # what Relay._claim binds (psycopg ignores unused names)
        "limit": batch,
        "lock_space": getattr(relay, "_RELAY_LOCK_SPACE", 0),
    }
    count, times = 0, list[float]()
    while True:
        began = time.perf_counter()
        with conn.transaction():
            params["now"] = datetime.now(UTC)
            rows = conn.execute(relay._CLAIM_POSTGRES, params).fetchall()
            if rows:
                conn.execute(MARK_SQL, {"now": datetime.now(UTC), "seqs": [r[0] for r in rows]})
        if not rows:
            return count, times
        times.append(time.perf_counter() - began)
        count += len(rows)


# --- latency at half load ---------------------------------------------------------


def _writer(
    index: int,
    writers: int,
    tx_rate: float,
    per_tx: int,
    total: float,
    ready: Any,
    go: Any,
    t0: Any,
    out: Any,
) -> None:
    """A writer process: publish() ``per_tx`` messages per transaction on a fixed schedule."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    records: list[tuple[float, list[str]]] = []
    error = ""
    try:
        import django

        django.setup()
        from django.db import connection, transaction

        import outbox

        connection.ensure_connection()
        rng = Random(SEED + index)
        ready.put(index)
        go.wait()
        start = t0.value
        n = 0
        for j in range(math.ceil(total * tx_rate / writers) + 1):
            due = start + (j * writers + index) / tx_rate
            if due >= start + total:
                break
            if (delay := due - time.time()) > 0:
                time.sleep(delay)
            ids = []
            keys = sorted(f"order-{rng.randrange(KEYS)}" for _ in range(per_tx))
            with transaction.atomic():
                for key in keys:  # in one order: publish() locks each key to the commit
                    message = outbox.publish(
                        topic=TOPIC,
                        key=key,
                        type=TYPE,
                        payload={"order_id": index * 10_000_000 + n, "status": "shipped"},
                        headers={"traceparent": f"00-{rng.getrandbits(128):032x}-0-01"},
                    )
                    ids.append(str(message.message_id))
                    n += 1
            records.append((time.time(), ids))
        connection.close()
    except Exception as exc:
        error = f"writer {index}: {type(exc).__name__}: {exc}"
        ready.put(index)  # do not keep the parent waiting
    out.put((records, error))


class Consumer:
    """Consumes the bound queue on a private event loop; records first arrival per id."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrivals: dict[str, float] = {}
        self.duplicates = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._connection: Any = None

    async def _on_message(self, message: Any) -> None:
        now = time.time()
        message_id = message.header.properties.message_id
        if message_id in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[message_id] = now

    async def _start(self) -> None:
        self._connection = await aio_pika.connect(self.url, timeout=10)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=2_000)
        await channel.declare_queue(QUEUE, durable=True, passive=True)
        # aiormq's consumer (aio-pika's layer below its IncomingMessage): the client
        # shares the cores with the relay, PostgreSQL and RabbitMQ, and a consumer that
        # falls behind leaves messages in the queue, which the broker must then write
        # to disk before it confirms them: the latency measured would be the bench's.
        underlay = await channel.get_underlay_channel()
        await underlay.basic_consume(QUEUE, self._on_message, no_ack=True)

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(15)

    def count(self) -> int:
        return len(self.arrivals)

    def close(self) -> None:
        try:
            if self._connection is not None:
                coro = self._connection.close()
                asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


@contextlib.contextmanager
def relay_running(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``manage.py run_relay`` in its own session; stopped by SIGTERM, must exit 0."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "run_relay"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "relay: publishing" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"run_relay did not start:\n{_tail(log)}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"run_relay exited with {proc.returncode}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(f"  {line}" for line in log.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(procs: Sequence[Any], ready: Any) -> None:
    """Every writer set up (or failed trying, and said so)."""
    deadline, waiting = time.monotonic() + 120, len(procs)
    while waiting:
        try:
            ready.get(timeout=1)
            waiting -= 1
        except queue.Empty:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                raise BenchError(f"writer exited during set-up (exit {dead[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise BenchError("writers not ready within 120 s") from None


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank of sorted ``values``."""
    return values[min(len(values) - 1, max(0, math.ceil(p * len(values)) - 1))]


def run_latency(
    args: argparse.Namespace, dsn: str, url: str, env: dict[str, str], target: float
) -> Latency:
    per_tx = args.per_tx or max(1, math.ceil(target / MAX_COMMITS_PER_S))
    tx_rate = target / per_tx
    total = args.warmup + args.latency_seconds
    print(
        f"running latency at half load: {target:,.0f} messages/s for {total:g} s "
        f"({args.writers} writers, {per_tx} per transaction) ...",
        flush=True,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLE}")
        conn.execute(f"VACUUM (ANALYZE) {TABLE}")
        conn.execute("CHECKPOINT")
    asyncio.run(_declare(url))
    consumer = Consumer(url)
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go, t0 = ctx.Event(), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_writer,
            args=(i, args.writers, tx_rate, per_tx, total, ready, go, t0, out),
            daemon=True,
        )
        for i in range(args.writers)
    ]
    outs: list[tuple[list[tuple[float, list[str]]], str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        log = Path(tmp, "run_relay.log")
        try:
            consumer.start()
            with relay_running(env, log) as relay:
                for proc in procs:
                    proc.start()
                _wait_ready(procs, ready)
                t0.value = time.time() + 0.2
                go.set()
                start = t0.value + args.warmup
                end = start + args.latency_seconds
                parties = {
                    "relay": {relay.pid},
                    "writers": {p.pid for p in procs if p.pid},
                    "consumer": {os.getpid()},
                }
                time.sleep(max(0.0, start - time.time()))
                meter = CpuMeter(parties)
                time.sleep(max(0.0, end - time.time()))
                cpu, disturbed = meter.stop()
                outs = [out.get(timeout=120) for _ in procs]
                errors = [e for _, e in outs if e]
                if errors:
                    raise BenchError("; ".join(errors))
                written = sum(len(ids) for records, _ in outs for _, ids in records)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if status_counts(dsn).get("published", 0) >= written and (
                        consumer.count() >= written
                    ):
                        break
                    time.sleep(0.2)
            if "Traceback" in log.read_text(errors="replace"):
                raise BenchError(f"run_relay logged errors:\n{_tail(log)}")
        finally:
            consumer.close()
            for proc in procs:
                if proc.pid is None:
                    continue  # never started
                if proc.is_alive():
                    proc.terminate()
                proc.join()
    commits = {mid: at for records, _ in outs for at, ids in records for mid in ids}
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT id::text, status, extract(epoch FROM published_at) FROM {TABLE}"
        ).fetchall()
    published = {mid: float(at) for mid, status, at in rows if status == "published"}
    lost = [mid for mid in commits if mid not in published]
    undelivered = [mid for mid in commits if mid not in consumer.arrivals]
    if lost or undelivered or len(rows) != len(commits):
        raise BenchError(
            f"latency: {len(commits):,} written, {len(rows):,} rows, {len(lost):,} not published, "
            f"{len(undelivered):,} not delivered within 60 s"
        )
    window = [mid for mid, at in commits.items() if start <= at < end]
    if not window:
        raise BenchError("latency: no transaction committed inside the window")
    tx_in_window = sum(1 for records, _ in outs for at, _ in records if start <= at < end)
    return Latency(
        target_rate=target,
        rate=len(window) / args.latency_seconds,
        commits_rate=tx_in_window / args.latency_seconds,
        writers=args.writers,
        per_tx=per_tx,
        window=args.latency_seconds,
        confirm_ms=sorted(1000 * (published[mid] - commits[mid]) for mid in window),
        delivery_ms=sorted(1000 * (consumer.arrivals[mid] - commits[mid]) for mid in window),
        duplicates=consumer.duplicates,
        cpu=cpu,
        note=disturbed,
    )


# --- the peer: django-outbox-pattern ----------------------------------------------


class PeerSkipped(Exception):
    """The peer could not be set up or run; its ratio is not measured."""


def _run(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerSkipped(f"{' '.join(command[:3])}: {exc}") from None


def _last_lines(text: str, n: int = 6) -> str:
    return "\n    ".join(text.strip().splitlines()[-n:])


def peer_setup(base: str) -> Path:
    """The peer's virtualenv, the STOMP plugin, its database; returns its python."""
    if not (PEER_DIR / "bench.py").exists():
        raise PeerSkipped(f"{PEER_DIR / 'bench.py'} not found")
    python = PEER_VENV / "bin" / "python"
    probe = [str(python), "-c", "import django_outbox_pattern, psycopg"]
    if not python.exists() or _run(probe, 60).returncode:
        print(f"peer: creating {PEER_VENV} and installing {', '.join(PEER_PACKAGES)}", flush=True)
        if not python.exists():
            done = _run([sys.executable, "-m", "venv", str(PEER_VENV)], 300)
            if done.returncode:
                raise PeerSkipped(f"python -m venv failed:\n    {_last_lines(done.stderr)}")
        pip = [str(python), "-m", "pip", "install", "--quiet", *PEER_PACKAGES]
        done = _run(pip, 900)
        if done.returncode or _run(probe, 60).returncode:
            raise PeerSkipped(f"pip install failed:\n    {_last_lines(done.stderr)}")
    plugins = shutil.which("rabbitmq-plugins") or "/usr/sbin/rabbitmq-plugins"
    done = _run([plugins, "enable", "rabbitmq_stomp"], 180)
    if done.returncode:
        raise PeerSkipped(
            f"`rabbitmq-plugins enable rabbitmq_stomp` failed (exit {done.returncode}; the peer "
            "relays over STOMP: "
            f"enable the plugin by hand, as the RabbitMQ admin):\n    "
            f"{_last_lines(done.stdout + done.stderr)}"
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", STOMP_PORT), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise PeerSkipped(f"STOMP port {STOMP_PORT} not listening") from None
            time.sleep(0.5)
    try:
        database_recreate(base, PEER_DB)
    except psycopg.Error as exc:
        raise PeerSkipped(f"CREATE DATABASE {PEER_DB}: {exc}") from None
    return python


def run_peer(base: str, n: int) -> Result:
    python = peer_setup(base)
    print(f"running django-outbox-pattern ({n:,} messages) ...", flush=True)
    pg = urlsplit(base)
    env = {
        **os.environ,
        "PEER_DB": PEER_DB,
        "PGHOST": pg.hostname or "127.0.0.1",
        "PGUSER": pg.username or "postgres",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = _run([str(python), str(PEER_DIR / "bench.py"), str(n)], 3600, env=env, cwd=PEER_DIR)
    found = re.search(r"writes_per_s=(\d+) relay_msgs_per_s=(\d+)", done.stdout)
    if done.returncode or not found:
        raise PeerSkipped(
            f"the peer script failed (exit {done.returncode}):\n    "
            f"{_last_lines(done.stdout + done.stderr)}"
        )
    rate = float(found[2])
    return Result(
        "django-outbox-pattern relay (STOMP)",
        "peer",
        n,
        n / rate,
        note=f"its writes: {int(found[1]):,} single-message transactions/s; "
        "CPU not sampled (one process for writes and relay)",
    )


# --- main -------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer messages, a shorter window")
    p.add_argument(
        "--messages",
        type=int,
        default=int(env_num("BENCH_MESSAGES", 0)),
        help=f"messages preloaded (default {FULL_MESSAGES:,}; --quick {QUICK_MESSAGES:,})",
    )
    p.add_argument(
        "--peer-messages",
        type=int,
        default=int(env_num("BENCH_PEER_MESSAGES", 0)),
        help=f"messages for the peer (default {FULL_PEER:,}; --quick {QUICK_PEER:,})",
    )
    p.add_argument("--no-peer", action="store_true", help="skip django-outbox-pattern")
    p.add_argument(
        "--writers",
        type=int,
        default=int(env_num("BENCH_WRITERS", 4)),
        help="writer processes in the latency phase",
    )
    p.add_argument(
        "--per-tx",
        type=int,
        default=int(env_num("BENCH_PER_TX", 0)),
        help="messages per writer transaction (default: enough to stay under "
        f"{MAX_COMMITS_PER_S} commits/s)",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=env_num("BENCH_LATENCY_SECONDS", 0),
        help="measured window of the latency phase (default 15; --quick 5)",
    )
    p.add_argument(
        "--warmup", type=float, default=env_num("BENCH_WARMUP", 3), help="s before the window"
    )
    p.add_argument(
        "--amqp",
        default=os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
        help="RabbitMQ URL",
    )
    args = p.parse_args()
    args.messages = args.messages or (QUICK_MESSAGES if args.quick else FULL_MESSAGES)
    args.peer_messages = args.peer_messages or (QUICK_PEER if args.quick else FULL_PEER)
    args.latency_seconds = args.latency_seconds or (5.0 if args.quick else 15.0)
    if args.quick:
        args.warmup = min(args.warmup, 2.0)
    return args


def _django_setup(env: dict[str, str]) -> None:
    for name in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "DEBUG", "BROKER_URL"):
        os.environ[name] = env[name]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()  # applies the product's LOGGING
    logging.getLogger("aio_pika").setLevel(logging.WARNING)  # "Purging queue" lines


def run_phases(args: argparse.Namespace, dsn: str, url: str, env: dict[str, str], run: Run) -> None:
    from django.db import connections

    from outbox.relay import Relay
    from outbox.transports.rabbitmq import RabbitMQTransport
    from sagaadmin.gc_tuning import gc_tune

    me = {"client": {os.getpid()}}  # the relaying process: this one
    batch = run.batch_size
    print(f"generating {args.messages:,} messages ...", flush=True)
    messages = make_messages(args.messages)
    # The relay runs in this process: tune the collector as run_relay does (ADR 0017),
    # which also keeps the bench's own objects out of its garbage collections (a
    # run_relay process does not hold 200,000 messages).
    gc_tune()
    results = run.results

    def add(result: Result) -> None:
        results[result.kind] = result
        print(f"  {result.messages:,} messages in {result.seconds:.2f} s", flush=True)

    preload(dsn, messages)
    with psycopg.connect(dsn, autocommit=True) as conn:
        raw = "raw database: claim + mark (psycopg, no broker)"
        add(measured(raw, "db", lambda: raw_db(conn, batch), me))
    check_all_published(dsn, args.messages, "raw database")

    preload(dsn, messages)
    null = "relay, instant transport (product, no broker)"
    add(measured(null, "null", lambda: relay_drain(NullTransport(), null), me))
    connections.close_all()
    check_all_published(dsn, args.messages, null)

    add(
        measured(
            "raw broker: aiormq, confirms (no database)",
            "broker",
            lambda: raw_broker(url, messages, batch),
            me,
        )
    )
    check_queue(url, args.messages, "raw broker")

    add(
        measured(
            "RabbitMQTransport alone (no database)",
            "transport",
            lambda: transport_alone(url, messages, batch),
            me,
        )
    )
    check_queue(url, args.messages, "RabbitMQTransport alone")

    preload(dsn, messages)
    label = "relay -> RabbitMQ (Relay.drain, one loop)"
    add(measured(label, "drain", lambda: relay_drain(RabbitMQTransport(url), label), me))
    connections.close_all()
    check_all_published(dsn, args.messages, label)
    check_queue(url, args.messages, label)

    preload(dsn, messages)
    transport = RabbitMQTransport(url)
    loops = Relay(transport).loops()
    label = f"relay -> RabbitMQ (Relay.run, {loops} loops, as run_relay)"
    add(measured(label, "relay", RelayRun(transport, label, args.messages), me))
    connections.close_all()
    check_all_published(dsn, args.messages, label)
    check_queue(url, args.messages, label)

    run.latency = run_latency(args, dsn, url, env, results["relay"].rate / 2)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill too
    began = time.monotonic()
    dsn, pg_version = database_recreate(base_dsn(), DB_NAME)
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "DEBUG": "0",
        "BROKER_URL": args.amqp,
    }
    print(f"database {DB_NAME} recreated; migrating", flush=True)
    manage(env, "migrate", "--noinput", "-v", "0")
    _django_setup(env)
    from outbox.relay import RelaySettings

    try:
        broker_version = asyncio.run(_declare(args.amqp))
    except Exception as exc:
        raise BenchError(f"RabbitMQ at {args.amqp.split('@')[-1]}: {exc!r}") from None
    run = Run(args.messages, RelaySettings.from_settings().batch_size, pg_version, broker_version)
    try:
        run_phases(args, dsn, args.amqp, env, run)
        if args.no_peer:
            run.peer_skipped = "--no-peer"
        else:
            try:
                run.results["peer"] = run_peer(base_dsn(), args.peer_messages)
            except PeerSkipped as exc:
                run.peer_skipped = str(exc)
                print(f"peer skipped: {exc}", flush=True)
    finally:  # what was measured, also when a phase failed
        with contextlib.suppress(Exception):
            asyncio.run(_broker_cleanup(args.amqp))
        if run.results:
            report(run, args, time.monotonic() - began)
    return 0


# --- the report -------------------------------------------------------------------


def report(run: Run, args: argparse.Namespace, elapsed: float) -> None:
    print()
    print(
        f"Saga Admin outbox relay benchmark: {os.cpu_count()} cores, PostgreSQL {run.pg_version}, "
        f"RabbitMQ {run.broker_version}; {run.messages:,} messages preloaded, "
        f"batch {run.batch_size}, {KEYS:,} keys, durable queue bound, persistent messages"
    )
    print()
    print(
        f"{'phase':<50}{'messages':>9}{'s':>8}{'messages/s':>12}{'batch p50':>11}{'p95 ms':>8}"
        "  CPU cores: client postgres rabbitmq  other"
    )
    for r in run.results.values():
        batches = sorted(r.batch_ms)
        p50 = f"{percentile(batches, 0.5):.1f}" if batches else "-"
        p95 = f"{percentile(batches, 0.95):.1f}" if batches else "-"
        cpu = (
            "".join(
                f"{r.cpu.get(k, 0.0):>9.2f}" for k in ("client", "postgres", "rabbitmq", "other")
            )
            if r.cpu
            else f"{'-':>9}" * 4
        )
        print(
            f"{r.label:<50}{r.messages:>9,}{r.seconds:>8.2f}{r.rate:>12,.0f}{p50:>11}{p95:>8}"
            f"     {cpu}"
        )
        if len(r.batch_ms) >= 20 and r.kind != "relay":  # its loops' batches overlap
            tenth = len(r.batch_ms) // 10
            first, last = sum(r.batch_ms[:tenth]), sum(r.batch_ms[-tenth:])
            if first and last:
                size = r.messages / len(r.batch_ms)
                print(
                    f"  first/last tenth of the batches: {1000 * tenth * size / first:,.0f} / "
                    f"{1000 * tenth * size / last:,.0f} messages/s"
                )
        if r.note:
            print(f"  note: {r.note}")
    if run.peer_skipped:
        print(f"{'django-outbox-pattern relay (STOMP)':<50}  not measured: {run.peer_skipped}")
    lat = run.latency
    if lat is not None:
        print()
        print(
            f"latency at half load (manage.py run_relay, LISTEN/NOTIFY): target "
            f"{lat.target_rate:,.0f} messages/s, committed {lat.rate:,.0f} messages/s in "
            f"{lat.commits_rate:,.0f} transactions/s over {lat.window:g} s "
            f"({lat.writers} writer processes, {lat.per_tx} messages per transaction)"
        )
        if lat.rate < 0.9 * lat.target_rate:
            print("  note: the writers fell short of the target rate: a lighter load was measured")
        for label, values in (
            ("commit -> broker confirm (published_at)", lat.confirm_ms),
            ("commit -> consumer delivery", lat.delivery_ms),
        ):
            print(
                f"  {label:<42} p50 {percentile(values, 0.5):7.1f} ms   "
                f"p95 {percentile(values, 0.95):7.1f} ms   max {values[-1]:7.1f} ms   "
                f"({len(values):,} messages)"
            )
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in lat.cpu.items())
        print(f"  CPU cores in the window: {cpu}; duplicates delivered: {lat.duplicates}")
        if lat.note:
            print(f"  note: {lat.note}")
    print()
    res = run.results
    if "relay" in res:
        relay = res["relay"].rate
        for kind, name in (("broker", "raw broker"), ("db", "raw database")):
            if kind in res:
                print(f"{'relay / ' + name:<46} {relay / res[kind].rate:7.3f}")
        if "broker" in res and "db" in res:
            slower = min((res["broker"], res["db"]), key=lambda r: r.rate)
            _verdict(
                f"relay / slower raw rate ({slower.label.split(':')[0]})",
                relay / slower.rate,
                BAR_RAW,
                f"needs >= {BAR_RAW * slower.rate:,.0f} messages/s",
            )
        if "peer" in res:
            _verdict(
                "relay / django-outbox-pattern relay",
                relay / res["peer"].rate,
                BAR_PEER,
                f"needs >= {BAR_PEER * res['peer'].rate:,.0f} messages/s",
            )
        else:
            print(f"{'relay / django-outbox-pattern relay':<46} not measured")
    if lat is not None:
        confirm_p95 = percentile(lat.confirm_ms, 0.95)
        verdict = "PASS" if confirm_p95 <= BAR_P95_MS else "FAIL"
        print(
            f"{'commit-to-confirm p95 at half load':<46} {confirm_p95:7.1f} ms  "
            f"(bar <= {BAR_P95_MS:g} ms)  {verdict}"
        )
    else:
        print(f"{'commit-to-confirm p95 at half load':<46} not measured")
    print(f"\n(run took {elapsed:.0f} s)")


def _verdict(label: str, ratio: float, bar: float, needed: str) -> None:
    verdict = "PASS" if ratio >= bar else "FAIL"
    print(f"{label:<46} {ratio:7.3f}  (bar >= {bar:.2f}, {needed})  {verdict}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\nbench/relay.py: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
