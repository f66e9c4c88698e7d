"""The relay: claim committed messages, publish them, mark them after the broker confirmed.

One claim is one transaction: ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL)
takes up to ``batch_size`` pending rows in sequence order; the transport sends
them and waits for the confirms; the rows are marked published (or given a
later ``available_at``, or dead) and the transaction commits. A crash before
the commit sends the batch again: delivery is at least once, consumers dedupe
by message id (the inbox).

Order per key (docs/outbox.md): ``publish()`` makes the writers of one key
take turns until they commit, so a key's committed rows are always a prefix
of its sequence numbers, in commit order. The relay sends them in that order;
a row waits while an earlier row of its key waits for a retry, and relays
claim a key under an advisory lock, so two relays never send one key's
messages side by side.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from outbox import versions
from outbox.api import NOTIFY_CHANNEL
from outbox.models import OutboxMessage, Status
from outbox.transports.base import Outgoing, Permanent, Skipped, Transport
from sagaadmin.db import server_side
from sagaadmin.telemetry import publish_span

log = logging.getLogger(__name__)

_COLUMNS = "o.seq, o.id, o.aggregatetype, o.aggregateid, o.type, o.version, o.payload, o.headers"
_CLAIM_POSTGRES = f"""
SELECT {_COLUMNS}
FROM outbox_outboxmessage o
WHERE o.status = 'pending' AND o.available_at <= %(now)s
  AND NOT EXISTS (
      SELECT 1 FROM outbox_outboxmessage b
      WHERE b.status = 'pending' AND b.aggregatetype = o.aggregatetype
        AND b.aggregateid = o.aggregateid AND b.seq < o.seq AND b.available_at > %(now)s)
  AND pg_try_advisory_xact_lock(%(lock_space)s, hashtext(o.aggregatetype || '/' || o.aggregateid))
ORDER BY o.seq
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED
"""  # noqa: S608 - constant SQL
# The claim's snapshot is taken before its advisory locks: a relay that held a key and
# scheduled its head for a retry may commit in between, unseen by NOT EXISTS above. Run
# after the claim (a new snapshot, taken once this relay holds the keys, so after any
# earlier holder committed), it names the claimed rows that must wait after all. (A new
# snapshot per statement: READ COMMITTED, the relay's transactions' isolation level.)
_HELD_BACK_POSTGRES = """
SELECT o.seq FROM outbox_outboxmessage o
WHERE o.seq = ANY(%(seqs)s)
  AND EXISTS (
      SELECT 1 FROM outbox_outboxmessage b
      WHERE b.status = 'pending' AND b.aggregatetype = o.aggregatetype
        AND b.aggregateid = o.aggregateid AND b.seq < o.seq AND b.available_at > %(now)s)
"""
_MARK_POSTGRES = """
UPDATE outbox_outboxmessage SET status = 'published', published_at = %s, last_error = ''
WHERE seq = ANY(%s)
"""
_RELAY_LOCK_SPACE = 0x5A6A_0002  # two-int advisory keys: (this, hash of topic/key)
# SQLite has one writer at a time (BEGIN IMMEDIATE): commit order is sequence order.
_CLAIM_SQLITE = f"""
SELECT {_COLUMNS}
FROM outbox_outboxmessage o
WHERE o.status = 'pending' AND o.available_at <= %(now)s
  AND NOT EXISTS (
      SELECT 1 FROM outbox_outboxmessage b
      WHERE b.status = 'pending' AND b.aggregatetype = o.aggregatetype
        AND b.aggregateid = o.aggregateid AND b.seq < o.seq AND b.available_at > %(now)s)
ORDER BY o.seq
LIMIT %(limit)s
"""  # noqa: S608 - constant SQL


@dataclass(frozen=True)
class RelaySettings:
    batch_size: int = 500
    max_attempts: int = 10
    backoff_base: float = 1.0  # seconds before the first retry
    backoff_max: float = 300.0
    poll_seconds: float = 1.0
    loops: int = 1  # claim loops side by side in run() (RELAY_LOOPS)

    @classmethod
    def from_settings(cls) -> RelaySettings:
        cfg = settings.OUTBOX
        return cls(
            batch_size=cfg["BATCH_SIZE"],
            max_attempts=cfg["MAX_ATTEMPTS"],
            backoff_base=cfg["BACKOFF_BASE_SECONDS"],
            backoff_max=cfg["BACKOFF_MAX_SECONDS"],
            poll_seconds=cfg["POLL_SECONDS"],
            loops=cfg["RELAY_LOOPS"],
        )


def backoff(attempts: int, cfg: RelaySettings) -> timedelta:
    """Exponential, capped, with "equal jitter": between half and all of the step."""
    step = min(cfg.backoff_base * 2 ** max(attempts - 1, 0), cfg.backoff_max)
    return timedelta(seconds=step * random.uniform(0.5, 1.0))


@dataclass
class BatchResult:
    published: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0
    held_back: int = 0  # claimed, then left by the re-check (_HELD_BACK_POSTGRES)

    @property
    def claimed(self) -> int:
        return self.published + self.retried + self.dead + self.skipped

    def add(self, other: BatchResult) -> None:
        """Count ``other``'s messages in this total (not its ``held_back``)."""
        self.published += other.published
        self.retried += other.retried
        self.dead += other.dead
        self.skipped += other.skipped


class Relay:
    def __init__(self, transport: Transport, cfg: RelaySettings | None = None) -> None:
        self.transport = transport
        self.cfg = cfg or RelaySettings.from_settings()

    def run_once(self) -> BatchResult:
        """Claim, publish and mark one batch (one transaction)."""
        with transaction.atomic():
            now = timezone.now()
            rows, held_back = self._claim_rows(now)
            if not rows:
                return BatchResult(held_back=held_back)
            outgoing = [
                Outgoing(
                    id=row[1] if isinstance(row[1], UUID) else UUID(str(row[1])),
                    topic=row[2],
                    key=row[3],
                    type=row[4],
                    version=row[5],
                    payload=row[6].encode(),
                    headers=_headers(row[7]),
                )
                for row in rows
            ]
            # A version this deployment cannot upcast is dead at once: retrying cannot help.
            unknown: dict[int, BaseException] = {}
            for i, message in enumerate(outgoing):
                try:
                    versions.check(message.type, message.version)
                except versions.UnknownVersion as exc:
                    unknown[i] = exc
            sendable = [m for i, m in enumerate(outgoing) if i not in unknown]
            answers = []
            if sendable:
                with publish_span([m.headers for m in sendable], type(self.transport).__name__):
                    answers = self.transport.publish(sendable)
            if len(answers) != len(sendable):
                raise RuntimeError("the transport answered for a different number of messages")
            sent = iter(answers)
            results = [unknown[i] if i in unknown else next(sent) for i in range(len(rows))]
            out = self._mark([row[0] for row in rows], results, timezone.now(), set(unknown))
            out.held_back = held_back
            return out

    def _claim_rows(self, now: datetime) -> tuple[list[tuple[Any, ...]], int]:
        """The rows to send, and how many claimed rows the re-check held back."""
        if connection.vendor != "postgresql":  # one writer at a time: no race to close
            with connection.cursor() as cursor:
                cursor.execute(_CLAIM_SQLITE, {"now": now, "limit": self.cfg.batch_size})
                return list(cursor.fetchall()), 0
        with connection.cursor() as cursor:
            # Every message leaves the pending indexes when it is published, but its
            # entry stays there, dead, until VACUUM: a busy outbox gathers tens of
            # thousands between two autovacuums. A bitmap scan visits the heap for
            # each of them on every claim (129,000 dead entries: 4.2 ms a claim); a
            # plain index scan marks them dead once and skips them after (0.24 ms).
            # The planner prefers the bitmap scan on a table without statistics yet.
            cursor.execute("SET LOCAL enable_bitmapscan = off")
            cursor.execute(
                _CLAIM_POSTGRES,
                {"now": now, "limit": self.cfg.batch_size, "lock_space": _RELAY_LOCK_SPACE},
            )
            rows = list(cursor.fetchall())
            if not rows:
                return rows, 0
        held = {
            seq
            for (seq,) in server_side(  # prepared: it runs on every claim that found rows
                _HELD_BACK_POSTGRES, {"seqs": [row[0] for row in rows], "now": now}, returns=True
            )
        }
        # left locked and unchanged until this transaction ends; claimed again once due
        return ([row for row in rows if row[0] not in held] if held else rows), len(held)

    def _mark(
        self,
        seqs: Sequence[int],
        results: Sequence[BaseException | None],
        now: datetime,
        fatal: frozenset[int] | set[int] = frozenset(),
    ) -> BatchResult:
        out = BatchResult()
        published = [seq for seq, r in zip(seqs, results, strict=True) if r is None]
        if published:
            if connection.vendor == "postgresql":  # one array parameter, a prepared statement
                server_side(_MARK_POSTGRES, [now, published], returns=False)
            else:
                OutboxMessage.objects.filter(seq__in=published).update(
                    status=Status.PUBLISHED, published_at=now, last_error=""
                )
            out.published = len(published)
        failed = {
            seq: r
            for seq, r in zip(seqs, results, strict=True)
            if r is not None and not isinstance(r, Skipped)
        }
        out.skipped = sum(isinstance(r, Skipped) for r in results)
        if failed:  # one read and one write for all of them (a broker outage fails whole batches)
            fatal_seqs = {seqs[i] for i in fatal}
            rows = list(
                OutboxMessage.objects.filter(seq__in=list(failed)).only(
                    "seq", "attempts", "status", "last_error", "available_at"
                )
            )
            for row in rows:
                error = failed[row.seq]
                row.attempts += 1
                row.last_error = f"{type(error).__name__}: {error}"[:2000]
                if (
                    row.attempts >= self.cfg.max_attempts
                    or row.seq in fatal_seqs
                    or isinstance(error, Permanent)
                ):
                    row.status = Status.DEAD
                    out.dead += 1
                    log.error(
                        "outbox message %s is dead after %d attempts: %s",
                        row.seq,
                        row.attempts,
                        row.last_error,
                    )
                else:
                    row.available_at = now + backoff(row.attempts, self.cfg)
                    out.retried += 1
            OutboxMessage.objects.bulk_update(
                rows, ["attempts", "status", "last_error", "available_at"]
            )
        return out

    def drain(self) -> BatchResult:
        """Run batches until nothing is claimable now (tests, ``run_relay --once``)."""
        total = BatchResult()
        while True:
            result = self.run_once()
            total.add(result)
            if result.claimed == 0 or result.published == 0:
                return total

    def loops(self) -> int:
        """How many claim loops :meth:`run` runs side by side: ``cfg.loops`` on PostgreSQL
        (two relays never send one key's messages side by side: the claim's advisory
        locks), with a transport whose ``publish`` may be called from two threads at once
        (``concurrent_publish``); else 1 (SQLite has one writer at a time)."""
        if connection.vendor != "postgresql":
            return 1
        if not getattr(self.transport, "concurrent_publish", False):
            return 1
        return max(1, self.cfg.loops)

    def run(self, stop: threading.Event) -> None:
        """Publish until ``stop`` is set, with :meth:`loops` claim loops side by side: while
        one waits for the broker's confirms, another claims and sends the next batch.
        Each loop finishes the batch in flight before it returns. A loop that fails
        stops the others, and its error is raised here (as with one loop)."""
        loops = self.loops()
        if loops == 1:
            self._run_loop(stop)
            return
        halt = _Halt(stop)
        errors: list[BaseException] = []

        def extra() -> None:
            try:
                self._run_loop(halt)
            except BaseException as exc:
                errors.append(exc)
                halt.failed.set()
            finally:
                connection.close()  # this thread's

        threads = [
            threading.Thread(target=extra, name=f"relay-{i}", daemon=True) for i in range(1, loops)
        ]
        for thread in threads:
            thread.start()
        try:
            self._run_loop(halt)
        except BaseException:
            halt.failed.set()
            raise
        finally:
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]

    def _run_loop(self, stop: threading.Event | _Halt) -> None:
        """One claim loop: between batches wait for NOTIFY or the poll interval."""
        listener = _Listener() if connection.vendor == "postgresql" else None
        try:
            while not stop.is_set():
                try:
                    result = self.run_once()
                except DatabaseError as exc:
                    log.warning("relay: database error, retrying: %s", exc)
                    connection.close()
                    stop.wait(self.cfg.poll_seconds)
                    continue
                if result.claimed + result.held_back >= self.cfg.batch_size and result.published:
                    continue  # more is waiting
                if listener is not None:
                    listener.wait(self.cfg.poll_seconds, stop)
                else:
                    stop.wait(self.cfg.poll_seconds)
        finally:
            if listener is not None:
                listener.close()


class _Halt:
    """Stops every claim loop of one :meth:`Relay.run`: the caller's ``stop``, or
    ``failed`` (a loop failed). Waits in steps of 0.2 s to see either."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.failed = threading.Event()

    def is_set(self) -> bool:
        return self.stop.is_set() or self.failed.is_set()

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set() and (left := deadline - time.monotonic()) > 0:
            self.stop.wait(min(left, 0.2))
        return self.is_set()


def _headers(value: Any) -> dict[str, str]:
    if isinstance(value, str):  # raw SQL returns JSON as text
        value = msgspec.json.decode(value)
    return {str(k): str(v) for k, v in (value or {}).items()}


class _Listener:
    """A separate autocommit connection that LISTENs for publish() notifications."""

    def __init__(self) -> None:
        import psycopg

        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        self.conn: Any = psycopg.connect(**params, autocommit=True)
        self.conn.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def wait(self, timeout: float, stop: threading.Event | _Halt) -> None:
        """Until a notification, ``timeout`` or ``stop`` (checked twice a second)."""
        deadline = time.monotonic() + timeout
        try:
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                for _ in self.conn.notifies(timeout=min(left, 0.5), stop_after=1):
                    return
        except Exception as exc:  # the listener broke: fall back to polling this time
            log.warning("relay: LISTEN connection failed: %s", exc)
            stop.wait(max(deadline - time.monotonic(), 0))

    def close(self) -> None:
        self.conn.close()
