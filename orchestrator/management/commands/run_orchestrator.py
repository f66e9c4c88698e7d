"""``manage.py run_orchestrator``: orchestrator workers alone (``run_worker`` runs them too).

``--drain`` advances every due run until none is due, then exits.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from orchestrator.worker import Worker
from sagaadmin.gc_tuning import gc_tune


class Command(BaseCommand):
    help = "Claim and advance orchestrated sagas until SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--drain", action="store_true", help="run until nothing is due")
        parser.add_argument("--name", default=None, help="worker name (default host:pid:random)")

    def handle(self, *args: Any, **options: Any) -> None:
        gc_tune()
        worker = Worker(owner=options["name"])
        if options["drain"]:
            self.stdout.write(f"orchestrator: {worker.drain()} transitions")
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.stdout.write(f"orchestrator: worker {worker.owner}, SIGTERM stops")
        worker.run(stop)
        self.stdout.write("orchestrator: stopped")
