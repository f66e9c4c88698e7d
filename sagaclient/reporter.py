"""The reporter: protocol events built in the caller's thread, sent by a background thread.

Python 3.9+, standard library only. Nothing here raises into the caller's
code path: a full queue spools to ``spool_path`` (or drops, counted in
``stats``), a failing server is retried with backoff, a refused batch is
logged and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

try:  # with OpenTelemetry installed, reports carry the current trace (docs/client.md)
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - the client works without it
    _otel_trace = None  # type: ignore[assignment]

log = logging.getLogger("sagaclient")


def _current_trace() -> dict[str, str]:
    if _otel_trace is None:
        return {}
    context = _otel_trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


RETRYABLE_STATUSES = (429, 500, 502, 503, 504)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Reporter:
    """Reports saga events to ``url`` (Saga Admin's base URL) with a service key."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        service: str = "",
        queue_size: int = 10_000,
        batch_size: int = 200,
        flush_interval: float = 0.5,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
        spool_path: str | None = None,
        start: bool = True,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("url: Saga Admin's http:// or https:// base URL")
        self.endpoint = url.rstrip("/") + "/api/v1/events"
        self.key = key
        self.service = service
        self.queue_size = queue_size
        self.batch_size = min(batch_size, 1000)
        self.flush_interval = flush_interval
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.spool_path = spool_path
        self.clock = clock  # the time stamped on each event (timezone-aware)
        self.stats = {"sent": 0, "retried": 0, "spooled": 0, "dropped": 0, "refused": 0}
        self._queue: deque[dict[str, Any]] = deque()
        self._inflight = 0
        self._lock = threading.Condition()
        self._sequence = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_spool()
        if start:
            self._thread = threading.Thread(target=self._run, name="sagaclient", daemon=True)
            self._thread.start()

    # -- building events (caller's thread; never raises) ------------------------------

    def event(self, type: str, saga_id: str, **fields: Any) -> str:
        """Queue one protocol event; returns its id. Fields as docs/protocol.md names them."""
        event_id = uuid.uuid4().hex
        try:
            with self._lock:
                # Microseconds since the epoch, kept strictly increasing: in order
                # within this reporter, and across its restarts and the other
                # processes of the same service on this clock — with no per-saga
                # state to grow.
                sequence = max(self._sequence + 1, time.time_ns() // 1000)
                self._sequence = sequence
            body: dict[str, Any] = {
                "id": event_id,
                "saga_id": saga_id,
                "type": type,
                "occurred_at": self.clock().isoformat(),
                "sequence": sequence,
            }
            if self.service:
                body["service"] = self.service
            if "trace_id" not in fields:
                body.update(_current_trace())
            body.update({k: v for k, v in fields.items() if v is not None})
            self._enqueue([body])
        except Exception:  # reporting must never break the caller
            log.exception("sagaclient: could not queue a %s event", type)
        return event_id

    def saga(
        self,
        saga_id: str,
        saga_type: str,
        *,
        attributes: dict[str, Any] | None = None,
        deadline: str | None = None,
    ) -> SagaScope:
        """A context manager: ``saga.started`` on entry; ``saga.completed`` on a clean exit,
        ``saga.failed`` (with the exception as the error) when the block raises."""
        return SagaScope(self, saga_id, saga_type, attributes or {}, deadline)

    # -- the queue --------------------------------------------------------------------

    def _enqueue(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            room = self.queue_size - len(self._queue)
            self._queue.extend(events[:room])
            overflow = events[room:] if room < len(events) else []
            self._lock.notify_all()
        if overflow:
            self._spool(overflow)

    def _spool(self, events: list[dict[str, Any]]) -> None:
        if not self.spool_path:
            self.stats["dropped"] += len(events)
            log.warning("sagaclient: queue full, %d events dropped (no spool_path)", len(events))
            return
        try:
            with open(self.spool_path, "a", encoding="utf-8") as spool:
                for event in events:
                    spool.write(json.dumps(event, separators=(",", ":")) + "\n")
                spool.flush()
                os.fsync(spool.fileno())
            self.stats["spooled"] += len(events)
        except OSError:
            self.stats["dropped"] += len(events)
            log.exception("sagaclient: could not spool %d events", len(events))

    def _load_spool(self) -> None:
        """Events a previous run spooled go first (then the file is emptied)."""
        if not self.spool_path or not os.path.exists(self.spool_path):
            return
        try:
            with open(self.spool_path, encoding="utf-8") as spool:
                events = [json.loads(line) for line in spool if line.strip()]
            os.remove(self.spool_path)
        except (OSError, ValueError):
            log.exception("sagaclient: could not read the spool %s", self.spool_path)
            return
        self._queue.extend(events)

    # -- the sender (background thread) ---------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    if self._stop.is_set():
                        return
                    self._lock.wait(self.flush_interval)
                    continue
                batch = [
                    self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))
                ]
                self._inflight = len(batch)
            try:
                self._send(batch)
            finally:
                with self._lock:
                    self._inflight = 0
                    self._lock.notify_all()

    def _send(self, batch: list[dict[str, Any]]) -> None:
        """Until delivered, refused, or stopping (then spooled)."""
        delay = 0.2
        while True:
            status, retry_after = self._post(batch)
            if status == 200:
                self.stats["sent"] += len(batch)
                return
            if status is not None and status not in RETRYABLE_STATUSES:
                self.stats["refused"] += len(batch)
                log.error("sagaclient: %d events refused with HTTP %s; dropped", len(batch), status)
                return
            self.stats["retried"] += 1
            if self._stop.is_set():
                self._spool(batch)
                return
            wait = retry_after if retry_after is not None else delay * (0.5 + random.random())
            self._stop.wait(min(wait, self.max_backoff))
            delay = min(delay * 2, self.max_backoff)

    def _post(self, batch: list[dict[str, Any]]) -> tuple[int | None, float | None]:
        body = json.dumps({"events": batch}, separators=(",", ":")).encode()
        request = urllib.request.Request(  # noqa: S310 - http(s) only, checked in __init__
            self.endpoint,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                response.read()
                return response.status, None
        except urllib.error.HTTPError as exc:
            return exc.code, _retry_after(exc.headers.get("Retry-After"))
        except (urllib.error.URLError, OSError, TimeoutError):
            return None, None  # the server is away: retried

    # -- flush and shutdown -------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued was delivered (or refused). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Flush for up to ``timeout``, stop the sender; what is left goes to the spool."""
        self.flush(timeout)
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
        if left:
            self._spool(left)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error(exc: BaseException) -> dict[str, Any]:
    retryable = getattr(exc, "retryable", None)
    error: dict[str, Any] = {"type": type(exc).__name__[:200], "message": str(exc)[:4000]}
    if isinstance(retryable, bool):
        error["retryable"] = retryable
    return error


class _Scope:
    """A context manager that reports start, then success or failure."""

    def __init__(
        self, begin: Callable[[], Any], ok: Callable[[], Any], fail: Callable[[BaseException], Any]
    ):
        self._begin, self._ok, self._fail = begin, ok, fail

    def __enter__(self) -> _Scope:
        self._begin()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._ok()
        else:
            self._fail(exc)  # and the exception goes on to the caller


class SagaScope:
    """One saga's reporting: steps, compensations, and every other protocol event."""

    def __init__(
        self,
        reporter: Reporter,
        saga_id: str,
        saga_type: str,
        attributes: dict[str, Any],
        deadline: str | None,
    ) -> None:
        self.reporter, self.saga_id, self.saga_type = reporter, saga_id, saga_type
        self.attributes, self.deadline = attributes, deadline
        self.ended = False

    def emit(self, type: str, **fields: Any) -> str:
        return self.reporter.event(type, self.saga_id, saga_type=self.saga_type, **fields)

    def __enter__(self) -> SagaScope:
        self.emit("saga.started", attributes=self.attributes or None, deadline=self.deadline)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.ended:
            return
        if exc is None:
            self.emit("saga.completed")
        else:
            self.emit("saga.failed", error=_error(exc))

    def step(self, name: str, *, attempt: int = 1, idempotency_key: str = "") -> _Scope:
        """``step.started``; then ``step.succeeded``, or ``step.failed`` with the error."""
        key = idempotency_key or None
        return _Scope(
            lambda: self.emit("step.started", step=name, attempt=attempt, idempotency_key=key),
            lambda: self.emit("step.succeeded", step=name, attempt=attempt),
            lambda e: self.emit("step.failed", step=name, attempt=attempt, error=_error(e)),
        )

    def compensation(self, name: str, *, attempt: int = 1) -> _Scope:
        """``compensation.started``; then ``compensation.succeeded`` or ``.failed``."""
        return _Scope(
            lambda: self.emit("compensation.started", step=name, attempt=attempt),
            lambda: self.emit("compensation.succeeded", step=name, attempt=attempt),
            lambda e: self.emit("compensation.failed", step=name, attempt=attempt, error=_error(e)),
        )

    def end(self, type: str, **fields: Any) -> str:
        """A terminal event of your own (``saga.compensated``, ``saga.cancelled``, ...):
        the ``with`` block then reports nothing more on exit."""
        self.ended = True
        return self.emit(type, **fields)

    def heartbeat(self, step: str = "") -> str:
        return self.emit("heartbeat", step=step or None)
