"""A circuit breaker per target service of remote steps.

Closed: commands go out; ``CIRCUIT_FAILURES`` consecutive failures (error
replies or timeouts) open it. Open: remote steps to that service wait (the
run says "waiting: circuit open") without using up attempts, until
``CIRCUIT_OPEN_SECONDS`` passed. Half open: one command goes out as a probe;
its success closes the circuit, its failure opens it again.

Called inside the orchestrator's transitions (the run row is locked first).
A closed circuit with no failures is never written, so healthy traffic does
not contend on the row.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings

from orchestrator.models import Circuit

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def _open_for() -> timedelta:
    return timedelta(seconds=settings.ORCHESTRATOR["CIRCUIT_OPEN_SECONDS"])


def allow(service: str, *, now: datetime) -> tuple[bool, datetime | None]:
    """May a command go to ``service`` now? (False, when to look again) when not."""
    state = Circuit.objects.filter(service=service).values_list("state", flat=True).first()
    if state is None or state == CLOSED:
        return True, None
    row = Circuit.objects.select_for_update().get(service=service)
    if row.state == OPEN and row.retry_at is not None and now >= row.retry_at:
        row.state = HALF_OPEN
        row.probe_command_id = ""
        row.save(update_fields=["state", "probe_command_id"])
        return True, None
    if row.state == HALF_OPEN and not row.probe_command_id:
        return True, None
    retry_at = row.retry_at if row.retry_at and row.retry_at > now else now + _open_for()
    return False, retry_at


def sent(service: str, command_id: str) -> None:
    """A command went out: in half open, it is the probe."""
    Circuit.objects.filter(service=service, state=HALF_OPEN, probe_command_id="").update(
        probe_command_id=command_id
    )


def record(service: str, *, ok: bool, now: datetime, command_id: str = "") -> None:
    """A command's outcome (a reply, or a timeout as ``ok=False``)."""
    if not service:
        return
    if ok:
        Circuit.objects.filter(service=service).exclude(state=CLOSED, failures=0).update(
            state=CLOSED, failures=0, opened_at=None, retry_at=None, probe_command_id=""
        )
        return
    row, _ = Circuit.objects.select_for_update().get_or_create(service=service)
    row.failures += 1
    threshold = settings.ORCHESTRATOR["CIRCUIT_FAILURES"]
    if row.state == HALF_OPEN or (row.state == CLOSED and row.failures >= threshold):
        row.state = OPEN
        row.opened_at = now
        row.retry_at = now + _open_for()
        row.probe_command_id = ""
    row.save()


def circuits_list() -> list[Circuit]:
    return list(Circuit.objects.order_by("service"))
