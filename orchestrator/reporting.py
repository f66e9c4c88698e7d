"""How orchestrated sagas reach Saga Admin: protocol events through a configured reporter.

The orchestrator never imports ``tracking`` (DESIGN.md). ``settings.ORCHESTRATOR
["REPORTER"]`` names a callable ``report(*, service, events)``; inside Saga
Admin it is tracking's in-process ingest (the function the REST endpoint uses),
called in the transition's transaction, so a transition and its telemetry
commit together. A service running the orchestrator on its own points it at
sagaclient's HTTP reporter, or leaves it empty (no reporting).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

from sagaadmin.telemetry import current_ids

Reporter = Callable[..., None]


@functools.cache
def _load(path: str) -> Reporter | None:
    return import_string(path) if path else None


def reporter() -> Reporter | None:
    return _load(settings.ORCHESTRATOR.get("REPORTER", ""))


class Telemetry:
    """The events of one transition, numbered with the run's reporter sequence."""

    def __init__(self, run: Any, service: str) -> None:
        self.run = run
        self.service = service
        self.events: list[dict[str, Any]] = []

    def add(self, type_: str, at: datetime, **fields: Any) -> None:
        self.run.report_seq += 1
        event: dict[str, Any] = {
            "id": f"orch-{self.run.pk}-{self.run.report_seq}",
            "saga_id": self.run.saga_id,
            "saga_type": self.run.saga_type,
            "type": type_,
            "occurred_at": at.isoformat(),
            "sequence": self.run.report_seq,
        }
        event.update({k: v for k, v in fields.items() if v not in (None, "")})
        ids = current_ids()
        if ids is not None:
            event.setdefault("trace_id", ids[0])
            event.setdefault("span_id", ids[1])
        self.events.append(event)

    def send(self) -> None:
        telemetry_send([self])


def telemetry_send(batches: list[Telemetry]) -> None:
    """Report the events of several transitions: one report per service, each
    transition's events in order."""
    report = reporter()
    if report is None:
        return
    by_service: dict[str, list[dict[str, Any]]] = {}
    for batch in batches:
        if batch.events:
            by_service.setdefault(batch.service, []).extend(batch.events)
    for service, events in by_service.items():
        report(service=service, events=events)
