"""``manage.py run_worker``: the background process — relay, detector, orchestrator, housekeeping.

It lives in ``tracking`` because it serves both apps (outbox never imports tracking).

Loops: the relay (publishing, woken by NOTIFY) in a thread; the detector
(tracking/detector.py) in a thread, a pass every ``DETECT_INTERVAL_SECONDS``
(one active detector across all workers); orchestrator workers
(orchestrator/worker.py) and bulk operator actions (tracking/bulk_actions.py) in
threads; housekeeping every
``--housekeeping-seconds``: delete published messages past
``OUTBOX_RETENTION_DAYS`` and compact the overview rollups. SIGTERM or SIGINT
stops both after the work in hand.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError, connections

from orchestrator.engine import REPLIES_TOPIC
from orchestrator.replies import replies_consume
from orchestrator.worker import worker_run
from outbox.maintenance import published_delete
from outbox.relay import Relay
from outbox.transports import transport_from_url
from outbox.transports.inprocess import subscribed
from sagaadmin.gc_tuning import gc_tune
from tracking.bulk_actions import bulk_loop
from tracking.detector import detect_loop
from tracking.rollups import rollup_compact

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Run the outbox relay, the detector, the orchestrator and housekeeping until SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--housekeeping-seconds", type=float, default=60.0)

    def handle(self, *args: Any, **options: Any) -> None:
        gc_tune()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.serve(stop, housekeeping_seconds=options["housekeeping_seconds"])

    def serve(self, stop: threading.Event, *, housekeeping_seconds: float = 60.0) -> None:
        """Run every loop until ``stop`` is set (``manage.py demo`` calls this too)."""
        transport = transport_from_url(settings.BROKER_URL)
        threads = [
            threading.Thread(target=self._replies, args=(stop,), name="replies"),
            threading.Thread(target=self._relay, args=(transport, stop), name="relay"),
            threading.Thread(target=self._detector, args=(stop,), name="detector"),
            threading.Thread(target=worker_run, args=(stop,), name="orchestrator"),
            threading.Thread(target=self._bulk, args=(stop,), name="bulk-actions"),
        ]
        threads[0].start()
        if settings.BROKER_URL.startswith("inprocess:"):
            # the in-process transport confirms a message nobody listens to: let the
            # reply consumer subscribe before the relay sends anything
            deadline = time.monotonic() + 5
            while not subscribed(REPLIES_TOPIC) and time.monotonic() < deadline:
                time.sleep(0.01)
        for thread in threads[1:]:
            thread.start()
        self.stdout.write(
            f"worker: relay to {settings.BROKER_URL.split('@')[-1]}, detector, orchestrator, "
            "SIGTERM stops"
        )
        try:
            while not stop.is_set():
                self._housekeeping()
                stop.wait(housekeeping_seconds)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            transport.close()
            self.stdout.write("worker: stopped")

    def _relay(self, transport: Any, stop: threading.Event) -> None:
        try:
            Relay(transport).run(stop)
        finally:
            connections.close_all()

    def _detector(self, stop: threading.Event) -> None:
        try:
            detect_loop(
                stop,
                interval=settings.SAGAADMIN["DETECT_INTERVAL_SECONDS"],
                report=lambda result: log.info("%s", result),
            )
        finally:
            connections.close_all()

    def _replies(self, stop: threading.Event) -> None:
        try:
            replies_consume(stop)
        except Exception:  # the broker may be away: the rest of the worker goes on
            log.exception("worker: the reply consumer stopped; remote steps will time out")
        finally:
            connections.close_all()

    def _bulk(self, stop: threading.Event) -> None:
        try:
            bulk_loop(stop)
        finally:
            connections.close_all()

    def _housekeeping(self) -> None:
        try:
            days = settings.OUTBOX["RETENTION_DAYS"]
            deleted = published_delete(older_than=timedelta(days=days))
            if deleted:
                log.info("worker: deleted %d published messages older than %s days", deleted, days)
            rollup_compact()
        except DatabaseError as exc:
            log.warning("worker: housekeeping failed, next round retries: %s", exc)
            connections.close_all()
