"""``manage.py run_relay``: publish outbox messages to ``BROKER_URL`` until SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from outbox.relay import Relay
from outbox.transports import transport_from_url
from sagaadmin.gc_tuning import gc_tune


class Command(BaseCommand):
    help = "Publish committed outbox messages to the broker (BROKER_URL); stops on SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="publish what is claimable now, then exit"
        )
        parser.add_argument("--broker-url", default=None, help="default: the BROKER_URL setting")

    def handle(self, *args: Any, **options: Any) -> None:
        gc_tune()
        url = options["broker_url"] or settings.BROKER_URL
        transport = transport_from_url(url)
        relay = Relay(transport)
        try:
            if options["once"]:
                result = relay.drain()
                self.stdout.write(
                    f"published {result.published}, retrying {result.retried}, dead {result.dead}"
                )
                return
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            self.stdout.write(f"relay: publishing to {url.split('@')[-1]} (SIGTERM stops)")
            relay.run(stop)  # finishes the batch in flight, then returns
            self.stdout.write("relay: stopped")
        finally:
            transport.close()
