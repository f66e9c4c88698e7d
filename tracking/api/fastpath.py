"""The ASGI front door of ``POST /api/v1/events``: group commit for concurrent reports.

Django serves sync views under ASGI one at a time per process, and one
transaction per request pays a commit (and a dozen round trips) per event.
This endpoint instead parses and checks each request in the event loop, then
hands its events to an :class:`IngestBatcher`: while one flush runs, new
requests queue; the next flush stores all of them together, one transaction
per reporting service, and each request is answered after *its* events
committed, with its own per-event results. The answers are exactly those of
the Django view (same functions in :mod:`tracking.api.ingest`).
See docs/decisions/0008-ingest-fast-path.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, transaction

from sagaadmin import telemetry
from sagaadmin.problems import problem_bytes
from tracking import live
from tracking.api.ingest import (
    DB_UNAVAILABLE,
    UNKNOWN_KEY,
    Refused,
    Reply,
    body_split,
    problem,
    request_check,
    result_reply,
    unavailable,
)
from tracking.api.otlp import (
    OtlpRefused,
    otlp_answer,
    otlp_map,
    otlp_overloaded,
    otlp_raws,
    otlp_request_check,
    otlp_unavailable,
    unauthenticated,
)
from tracking.bulk import pipelined_transaction
from tracking.ingest import IngestResult, RawEvent, events_ingest
from tracking.keys import service_key_authenticate
from tracking.metrics import ingest_observed
from tracking.models import Service

log = logging.getLogger(__name__)
PATH = "/api/v1/events"
OTLP_PATHS = frozenset({"/v1/traces", "/api/v1/otlp/v1/traces"})


@dataclass(slots=True)
class _Job:
    service: Service
    raws: Sequence[RawEvent]
    future: asyncio.Future[IngestResult]


class Overloaded(Exception):
    """More events wait for the database than ``max_backlog``: answer 429, Retry-After."""


class IngestBatcher:
    """Coalesces concurrent ingest requests into few transactions (one flush at a time).

    Linger: when fewer requests wait than took part in the last cycle (the flush
    just done and those that waited for it), the next flush waits for the rest,
    until ``linger`` seconds after the last flush ended: clients just answered usually send their
    next report within a millisecond, and one flush of all of them costs much
    less than two. Under light load (one request per cycle) nothing waits.

    Back-pressure: when more than ``max_backlog`` events already wait for a flush, a new
    request is refused (:class:`Overloaded`, 429 with ``Retry-After``) instead of queueing
    without bound while the database falls behind.
    """

    def __init__(
        self,
        *,
        max_events: int = 5000,
        max_backlog: int | None = None,
        linger: float | None = None,
    ) -> None:
        self.max_events = max_events
        self.max_backlog = (
            max_backlog
            if max_backlog is not None
            else settings.SAGAADMIN["INGEST_MAX_BACKLOG_EVENTS"]
        )
        self.backlog = 0  # events in ``pending``
        self.pending: list[_Job] = []
        self.draining = False
        self.linger = (
            linger if linger is not None else settings.SAGAADMIN["INGEST_LINGER_MS"] / 1000
        )
        self.expected = 0  # requests in the last cycle: the one flushed and those waiting
        self._last_flush_end = 0.0
        self._arrived = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, where pushes run
        self._task: asyncio.Task[None] | None = None  # keeps the drain task referenced
        # One thread, so the flushes of this process share one database connection.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        self._flush = sync_to_async(self.flush, thread_sensitive=False, executor=self.executor)

    def close(self) -> None:
        """Give the flush thread's database connection back and stop the thread."""
        self.executor.submit(_close_connection).result()
        self.executor.shutdown()

    async def submit(self, service: Service, raws: Sequence[RawEvent]) -> IngestResult:
        if self.backlog and self.backlog + len(raws) > self.max_backlog:
            raise Overloaded(f"{self.backlog} events are waiting for the database")
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # the server's loop (tests run several, one after another)
            self.loop, self._arrived = loop, asyncio.Event()
        future: asyncio.Future[IngestResult] = loop.create_future()
        self.pending.append(_Job(service, raws, future))
        self.backlog += len(raws)
        self._arrived.set()
        if not self.draining:
            self.draining = True
            self._task = loop.create_task(self._drain())
        return await future

    async def _gather(self) -> None:
        """Linger (until ``linger`` s after the last flush ended) while fewer requests
        wait than took part in the last cycle: the clients just answered are likely
        sending their next report, and one flush of all of them costs little more than
        a flush of half (most of a flush is the same dozen statements whatever its
        size; docs/decisions/0008). After a quiet spell nothing waits."""
        if self.linger <= 0:
            return
        deadline = self._last_flush_end + self.linger  # after a quiet spell: no wait at all
        while len(self.pending) < self.expected and self.backlog < self.max_events:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        try:
            while self.pending:
                await self._gather()
                batch: list[_Job] = []
                size = 0
                while self.pending and (
                    not batch or size + len(self.pending[0].raws) <= self.max_events
                ):
                    job = self.pending.pop(0)
                    self.backlog -= len(job.raws)
                    batch.append(job)
                    size += len(job.raws)
                await self._flush(batch)
                self.expected = len(batch) + len(self.pending)
                self._last_flush_end = time.monotonic()
        finally:
            self.draining = False

    def flush(self, batch: list[_Job]) -> None:
        """Store a batch: one transaction per service; settle every job's future.

        If a group of several requests fails for another reason than the database being
        away (a bug, a value the database refuses), its requests are stored again one
        at a time, so only the request that caused it fails: one client's bad report
        never costs another client its answer.
        """
        assert self.loop is not None  # set by submit(), which queued these jobs
        by_service: dict[int, list[_Job]] = defaultdict(list)
        for job in batch:
            by_service[job.service.pk].append(job)
        for jobs in by_service.values():
            committed: list[bool] = []
            try:
                answers = self._store(jobs, committed)
            except BaseException as exc:
                # Stored already (a hook after the commit failed), the database away, or
                # nothing to isolate: every request of the group gets the error, as before.
                if committed or isinstance(exc, DB_UNAVAILABLE) or len(jobs) == 1:
                    _settle([(job.future, exc) for job in jobs])
                    continue
                log.warning(
                    "a group of %d ingest requests failed (%s: %s); storing them one by one",
                    len(jobs),
                    type(exc).__name__,
                    exc,
                )
                answers = []
                away: BaseException | None = None
                for job in jobs:
                    if away is not None:  # the database went away: do not wait for it again
                        answers.append((job.future, away))
                        continue
                    try:
                        answers += self._store([job], [])
                    except BaseException as alone:
                        answers.append((job.future, alone))
                        if isinstance(alone, DB_UNAVAILABLE):
                            away = alone
            _settle(answers)

    def _store(
        self, jobs: list[_Job], committed: list[bool]
    ) -> list[tuple[asyncio.Future[IngestResult], Any]]:
        """One transaction for these requests (of one service); each request's answer.
        ``committed`` gets an item once the transaction committed (its first on-commit
        hook), so a failure after that is not taken for one that stored nothing."""
        assert self.loop is not None
        raws = [raw for job in jobs for raw in job.raws]
        try:
            close_old_connections()
            with (
                live.pushes_on(self.loop),
                # a group of single events: statements and COMMIT in fewer round trips
                pipelined_transaction(rows=len(raws)),
            ):
                transaction.on_commit(lambda: committed.append(True))
                result = events_ingest(service=jobs[0].service, raws=raws)
        except BaseException as exc:
            if isinstance(exc, DB_UNAVAILABLE):
                connection.close()
            raise
        offset = 0
        answers: list[tuple[asyncio.Future[IngestResult], Any]] = []
        for job in jobs:
            mine = result.results[offset : offset + len(job.raws)]
            results = [replace(r, index=r.index - offset) for r in mine]
            answers.append((job.future, IngestResult(results, result.sagas_changed)))
            offset += len(job.raws)
        return answers


def _settle(answers: list[tuple[asyncio.Future[IngestResult], Any]]) -> None:
    """Give each future its result (an :class:`IngestResult`) or exception, in the
    futures' loop: one hand-over to the loop for all of them."""
    if not answers:
        return

    def settle() -> None:
        for future, answer in answers:
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    answers[0][0].get_loop().call_soon_threadsafe(settle)


class KeyCache:
    """Service keys by secret for a few seconds, so a report costs no key lookup.

    A revoked key stops working within ``ttl`` seconds (docs/decisions/0004).
    """

    def __init__(self, *, ttl: float) -> None:
        self.ttl = ttl
        self.entries: dict[str, tuple[float, Any]] = {}

    async def get(self, secret: str, executor: ThreadPoolExecutor) -> Any:
        now = time.monotonic()
        hit = self.entries.get(secret)
        if hit is not None and hit[0] > now:
            return hit[1]
        key = await sync_to_async(_authenticate, thread_sensitive=False, executor=executor)(secret)
        if len(self.entries) > 10_000:
            self.entries.clear()
        self.entries[secret] = (now + self.ttl, key)
        return key


def _close_connection() -> None:
    connection.close()


def _authenticate(secret: str) -> Any:
    close_old_connections()
    return service_key_authenticate(secret=secret)


class IngestEndpoint:
    """ASGI app for ``POST /api/v1/events`` (the body arrives whole, see BodyLimitMiddleware)."""

    def __init__(self) -> None:
        self.batcher = IngestBatcher()
        self.keys = KeyCache(ttl=settings.SAGAADMIN["KEY_CACHE_SECONDS"])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with telemetry.server_span(scope["method"], scope["path"], headers) as span:
            try:
                if scope["path"] in OTLP_PATHS:
                    reply = await self._handle_otlp(scope, receive, headers)
                else:
                    reply = await self._handle(scope, receive, headers)
            except Exception:
                log.exception("ingest fast path failed")
                reply = Reply(
                    500,
                    problem_bytes(
                        500, "internal-error", "The server failed; the error was logged."
                    ),
                )
            span.set_attribute("http.response.status_code", reply.status)
        ingest_observed(reply, time.perf_counter() - started)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-type", reply.content_type.encode()),
                    # a length, not chunks: one body write, and the client reads it at once
                    (b"content-length", b"%d" % len(reply.body)),
                    *((k.lower().encode(), v.encode()) for k, v in reply.headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})

    async def _handle(self, scope: Any, receive: Any, headers: dict[str, str]) -> Reply:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            secret = request_check(
                method=scope["method"],
                content_type=content_type,
                token=token.strip() if scheme.lower() == "bearer" and token.strip() else None,
            )
            body = await _read_body(receive)
            try:
                key = await self.keys.get(secret, self.batcher.executor)
            except DB_UNAVAILABLE as exc:
                return unavailable(exc)
            if key is None:
                return UNKNOWN_KEY
            raws = body_split(body)
        except Refused as refused:
            return refused.reply
        try:
            result = await self.batcher.submit(key.service, raws)
        except Overloaded as exc:
            return problem(
                429,
                "too-many-requests",
                f"Ingest is behind ({exc}); nothing was stored. Retry after the given seconds.",
                {"Retry-After": str(settings.SAGAADMIN["RETRY_AFTER_SECONDS"])},
            )
        except DB_UNAVAILABLE as exc:
            return unavailable(exc)
        return result_reply(result)

    async def _handle_otlp(self, scope: Any, receive: Any, headers: dict[str, str]) -> Reply:
        """OTLP/HTTP traces (tracking/api/otlp.py has the rules), group-committed like events."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        secret = token.strip() if scheme.lower() == "bearer" else ""
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            otlp_request_check(
                method=scope["method"], content_type=content_type, has_token=bool(secret)
            )
            body = await _read_body(receive)
            try:
                key = await self.keys.get(secret, self.batcher.executor)
            except DB_UNAVAILABLE as exc:
                return otlp_unavailable(content_type, exc)
            if key is None:
                raise unauthenticated(content_type)
            mapped = otlp_map(
                body,
                content_type=content_type,
                content_encoding=headers.get("content-encoding", ""),
            )
        except OtlpRefused as refused:
            return refused.reply
        result = None
        if mapped.events:
            try:
                result = await self.batcher.submit(key.service, otlp_raws(mapped))
            except Overloaded as exc:
                return otlp_overloaded(content_type, str(exc))
            except DB_UNAVAILABLE as exc:
                return otlp_unavailable(content_type, exc)
        return otlp_answer(mapped, result, content_type)


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class IngestRouter:
    """Sends ``POST /api/v1/events`` and the OTLP receiver's paths to the fast path, everything
    else to ``app``."""

    def __init__(self, app: Any, endpoint: IngestEndpoint | None = None) -> None:
        self.app = app
        self.endpoint = endpoint or IngestEndpoint()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"] == PATH or scope["path"] in OTLP_PATHS):
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)
