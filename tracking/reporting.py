"""In-process reporting for the orchestrator: its telemetry through the same ingest as the API.

``settings.ORCHESTRATOR["REPORTER"]`` points here inside Saga Admin. Called in
the orchestrator's transition transaction (events_ingest joins it), so a
transition and its events commit together or not at all.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tracking.ingest import REJECTED, events_ingest
from tracking.keys import service_get_or_create


class ReportRejected(ValueError):
    """The orchestrator built an event the protocol refuses (a bug: the transition rolls back)."""


def events_report(*, service: str, events: list[dict[str, Any]]) -> None:
    result = events_ingest(
        service=service_get_or_create(name=service), raws=[msgspec.json.encode(e) for e in events]
    )
    refused = [r.as_dict() for r in result.results if r.status == REJECTED]
    if refused:
        raise ReportRejected(f"telemetry refused: {refused}")
