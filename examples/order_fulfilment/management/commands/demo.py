"""``manage.py demo``: the order-fulfilment services and customers placing orders.

    manage.py demo                                  # everything, until Ctrl-C
    manage.py demo --rate 5 --duration 120 --mix decline=0.3,hang=0.1
    manage.py demo --services payment --no-traffic  # one service, as its own process

``make run`` starts it beside the web server. With the in-process transport
(the embedded default) it also runs the worker's loops (relay, detector,
orchestrator), because the relay can only deliver to services in its own
process; with a broker the worker and every service can be separate processes.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from examples.order_fulfilment.faults import DEFAULT_MIX, Mix
from examples.order_fulfilment.host import (
    keys_ensure,
    reporters_make,
    services_make,
    services_start,
)
from examples.order_fulfilment.services import SERVICES, OrderService
from examples.order_fulfilment.traffic import FLAVOURS, Traffic, thresholds_ensure
from tracking.management.commands.run_worker import Command as WorkerCommand


class Command(BaseCommand):
    help = "Run the example order-fulfilment services and place orders (demo traffic)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url", default="http://127.0.0.1:8000", help="Saga Admin's base URL for reports"
        )
        parser.add_argument("--rate", type=float, default=0.5, help="orders per second")
        parser.add_argument(
            "--mix",
            default=None,
            help=f"faults, e.g. decline=0.1,hang=0.05,skew=30 (default: {DEFAULT_MIX})",
        )
        parser.add_argument(
            "--duration", type=float, default=0.0, help="seconds of orders; 0: until stopped"
        )
        parser.add_argument("--flavours", default=",".join(FLAVOURS))
        parser.add_argument(
            "--services", default="all", help="which services this process runs: all, none, a,b"
        )
        parser.add_argument("--no-traffic", action="store_true", help="place no orders")
        parser.add_argument(
            "--no-showcase", action="store_true", help="skip the first order of each fault"
        )
        parser.add_argument(
            "--worker",
            choices=("auto", "yes", "no"),
            default="auto",
            help="run the worker's loops here too (auto: with the in-process transport)",
        )
        parser.add_argument(
            "--settle",
            type=float,
            default=15.0,
            help="after --duration, seconds to let sagas in flight finish before exiting "
            "(a process that runs the worker keeps running)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        mix = self._mix(options["mix"])
        names = self._names(options["services"])
        flavours = tuple(f.strip() for f in options["flavours"].split(",") if f.strip())
        if not flavours or set(flavours) - set(FLAVOURS):
            raise CommandError(f"--flavours: one or both of {', '.join(FLAVOURS)}")
        traffic = not options["no_traffic"]
        if options["rate"] <= 0:
            raise CommandError("--rate: orders per second, more than 0")
        inprocess = settings.BROKER_URL.startswith("inprocess:")
        worker = options["worker"] == "yes" or (options["worker"] == "auto" and inprocess)
        if inprocess and names and not worker:
            raise CommandError(
                "the in-process transport delivers only inside the relay's process: "
                "run the services with --worker yes (or set BROKER_URL to a broker)"
            )

        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        keys = keys_ensure(sorted({*names, *(["order"] if traffic else [])}), self._keys_path())
        role = "-".join(names) or "traffic"
        reporters = reporters_make(options["url"], keys, mix, role)
        threads = services_start(services_make(names, reporters), stop)
        if names:
            self.stdout.write(
                f"demo: services {', '.join(names)} on {settings.BROKER_URL.split('@')[-1]}, "
                f"reporting to {options['url']}"
            )
        if traffic:
            thresholds_ensure()
            placing = Traffic(
                OrderService(reporters["order"]),
                rate=options["rate"],
                mix=mix,
                flavours=flavours,
                duration=options["duration"],
                showcase=not options["no_showcase"],
                say=self.stdout.write,
            )
            thread = threading.Thread(
                target=self._traffic, args=(placing, stop, options, worker), name="traffic"
            )
            thread.start()
            threads.append(thread)
        try:
            if worker:
                WorkerCommand().serve(stop)
            else:
                stop.wait()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
            for reporter in reporters.values():
                reporter.close(timeout=5)
            self.stdout.write("demo: stopped")

    def _traffic(
        self, placing: Traffic, stop: threading.Event, options: dict[str, Any], worker: bool
    ) -> None:
        placing.run(stop)
        if not options["duration"] or stop.is_set():
            return
        if worker:  # the dashboard still needs the relay, detector and orchestrator
            self.stdout.write("demo: no more orders; services and worker go on (Ctrl-C stops)")
            return
        self.stdout.write(f"demo: letting sagas in flight finish ({options['settle']:g} s)")
        stop.wait(options["settle"])
        stop.set()

    @staticmethod
    def _mix(text: str | None) -> Mix:
        try:
            text = text if text is not None else settings.SAGAADMIN_DEMO_MIX
            return Mix.parse(text or DEFAULT_MIX)
        except ValueError as exc:
            raise CommandError(f"--mix: {exc}") from None

    @staticmethod
    def _names(text: str) -> list[str]:
        text = text.strip()
        if text == "all":
            return list(SERVICES)
        if text == "none":
            return []
        names = [n.strip() for n in text.split(",") if n.strip()]
        if unknown := [n for n in names if n not in SERVICES]:
            raise CommandError(
                f"--services: {', '.join(unknown)} unknown (all, none, or {', '.join(SERVICES)})"
            )
        return names

    @staticmethod
    def _keys_path() -> Any:
        from pathlib import Path

        return Path(settings.VAR_DIR) / "demo-keys.json"
