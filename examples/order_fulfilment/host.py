"""Running services: their keys, their reporters, their consumers on the broker.

Each service consumes two topics with the outbox's consumer runners (every
message applied once through the inbox): ``shop.events`` (the choreography)
and ``sagaadmin.commands`` (only its own ``<service>.*`` commands). With the
in-process transport the relay of the same process delivers them, so the
services must live in the worker's process
(docs/decisions/0013-demo-services-in-saga-admins-processes.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connections

from examples.order_fulfilment.faults import Mix
from examples.order_fulfilment.services import EVENTS_TOPIC, SERVICES, Service
from orchestrator.engine import COMMANDS_TOPIC
from outbox.consumers import run_consumer
from sagaclient import Reporter
from tracking.keys import service_key_authenticate, service_key_create

log = logging.getLogger(__name__)
SKEWED_SERVICE = "shipping"  # whose clock ``skew`` moves


def keys_ensure(names: list[str], path: Path) -> dict[str, str]:
    """A working service key per service, kept in ``path`` (0600) across restarts.

    Several demo processes start at once (one per service): a lock file makes
    them take turns, and the file is replaced atomically, never half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            keys: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            keys = {}
        changed = False
        for name in names:
            secret = keys.get(name, "")
            if not secret or service_key_authenticate(secret=secret) is None:
                keys[name] = service_key_create(service_name=name, name="demo").secret
                changed = True
        if changed:
            temporary = path.with_suffix(".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(keys, indent=2))
            os.replace(temporary, path)
    return {name: keys[name] for name in names}


class UnreliableReporter(Reporter):
    """A reporter behind a flaky network: some reports twice, some after the next one."""

    def __init__(self, *args: Any, duplicate: float = 0.0, reorder: float = 0.0, **kw: Any):
        self.duplicate, self.reorder = duplicate, reorder
        self._held: dict[str, Any] | None = None
        self._rng = random.Random()
        self._held_lock = threading.Lock()
        super().__init__(*args, **kw)

    def _enqueue(self, events: list[dict[str, Any]]) -> None:
        out: list[dict[str, Any]] = []
        with self._held_lock:
            for event in events:
                if self._held is None and self._rng.random() < self.reorder:
                    self._held = event  # goes out after the next report
                    continue
                out.append(event)
                if self._rng.random() < self.duplicate:
                    out.append(dict(event))  # same id: Saga Admin answers "duplicate"
                if self._held is not None:
                    out.append(self._held)
                    self._held = None
        if out:
            super()._enqueue(out)

    def flush(self, timeout: float = 10.0) -> bool:
        with self._held_lock:
            held, self._held = self._held, None
        if held is not None:
            super()._enqueue([held])
        return super().flush(timeout)


def reporters_make(
    url: str, keys: dict[str, str], mix: Mix, role: str = "all"
) -> dict[str, Reporter]:
    """One reporter per service (its own key); ``skew`` moves the shipping service's clock.
    ``role`` names this process's spool files (two processes never share one)."""
    spool = Path(settings.VAR_DIR) / "demo-spool"
    spool.mkdir(parents=True, exist_ok=True)
    out: dict[str, Reporter] = {}
    for name, key in keys.items():
        skew = timedelta(seconds=mix.skew if name == SKEWED_SERVICE else 0)
        out[name] = UnreliableReporter(
            url,
            key,
            duplicate=mix.duplicate,
            reorder=mix.reorder,
            spool_path=str(spool / f"{name}-{role}.jsonl"),
            clock=_clock(skew),
        )
    return out


def _clock(skew: timedelta) -> Callable[[], datetime]:
    return lambda: datetime.now(UTC) + skew


def services_start(
    services: list[Service],
    stop: threading.Event,
    broker_url: str | None = None,
    *,
    prefix: str = "example",
) -> list[threading.Thread]:
    """Start each service's two consumers (threads) until ``stop``; consumer
    (queue, group) names are ``<prefix>-<service>-events`` / ``-commands``."""
    url = broker_url or settings.BROKER_URL
    threads = []
    for service in services:
        for topic, handler, types in (
            (EVENTS_TOPIC, service.on_event, "#"),
            (COMMANDS_TOPIC, service.on_command, f"{service.name}.#"),
        ):
            kind = "events" if topic == EVENTS_TOPIC else "commands"
            thread = threading.Thread(
                target=_consume,
                args=(url, f"{prefix}-{service.name}-{kind}", topic, handler, types, stop),
                name=f"{service.name}-{kind}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
    return threads


def services_make(names: list[str], reporters: dict[str, Reporter]) -> list[Service]:
    return [SERVICES[name](reporters.get(name)) for name in names]


def _consume(
    url: str,
    consumer: str,
    topic: str,
    handler: Callable[..., None],
    types: str,
    stop: threading.Event,
) -> None:
    """One consumer; if the broker goes away it starts again until ``stop``."""
    try:
        while not stop.is_set():
            try:
                run_consumer(
                    url, consumer=consumer, topic=topic, handler=handler, stop=stop, types=types
                )
            except Exception:
                log.exception("%s: consumer stopped; starting again in 2 s", consumer)
                stop.wait(2.0)
    finally:
        connections.close_all()
