"""``manage.py detect``: run the detector (docs/detection.md).

``--once`` runs one pass and prints what it did; without it, a pass every
``DETECT_INTERVAL_SECONDS`` until SIGTERM (``run_worker`` runs the same loop).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from tracking.detector import detect_loop, detect_pass


class Command(BaseCommand):
    help = "Find stuck sagas, failed compensations and in-doubt transactions; open incidents."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="one pass, then exit")
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help="seconds between passes (default: DETECT_INTERVAL_SECONDS)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            self.stdout.write(str(detect_pass()))
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        interval = options["interval"] or settings.SAGAADMIN["DETECT_INTERVAL_SECONDS"]
        self.stdout.write(f"detector: a pass every {interval:g} s, SIGTERM stops")
        detect_loop(stop, interval=interval, report=lambda r: self.stdout.write(str(r)))
