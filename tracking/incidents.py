"""Incident lifecycle and alerts: acknowledge, resolve, and the rate-limited alert messages.

The detector (tracking/detector.py) opens incidents and resolves them when the
saga moves on; operators acknowledge and resolve them here. Every change
publishes a ``sagaadmin.incident.<event>`` message through the outbox in the
same transaction (topic ``sagaadmin.incidents``, key the saga id, so one
saga's messages keep their order). The detector's messages go through
:class:`Alerts`, a per-(saga type, kind) limit that folds a flood into one
``sagaadmin.incident.summary`` message; an operator's never are limited.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

import outbox
from outbox.versions import message_type
from tracking.live import notify_sagas_changed
from tracking.models import (
    AlertWindow,
    AuditEntry,
    Incident,
    IncidentStatus,
    Saga,
    join_delimited,
    split_delimited,
)

TOPIC = "sagaadmin.incidents"
EVENTS = ("opened", "acknowledged", "resolved")
for _event in (*EVENTS, "summary"):
    message_type(f"sagaadmin.incident.{_event}")
NOTE_MAX = 4000


class IncidentRefused(Exception):
    """The change is not allowed (field names what is wrong, for a problem+json answer)."""

    def __init__(self, field: str, message: str, *, status: int = 409) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def alert_payload(incident: Incident, event: str) -> dict[str, Any]:
    return {
        "event": event,
        "incident_id": incident.pk,
        "kind": incident.kind,
        "status": incident.status,
        "saga_id": incident.saga.saga_id,
        "saga_type": incident.saga_type,
        "step": incident.step,
        "reason": incident.reason,
        "evidence": [e["event_id"] for e in incident.evidence],
        "opened_at": incident.opened_at.isoformat(),
        "acknowledged_at": _iso(incident.acknowledged_at),
        "acknowledged_by": incident.acknowledged_by,
        "resolved_at": _iso(incident.resolved_at),
        "resolved_by": incident.resolved_by,
        "resolution": incident.resolution,
        "note": incident.resolution_note or incident.acknowledge_note,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def alert_publish(incident: Incident, event: str) -> None:
    outbox.publish(
        topic=TOPIC,
        key=incident.saga.saga_id,
        type=f"sagaadmin.incident.{event}",
        payload=alert_payload(incident, event),
    )


class Alerts:
    """The detector's alert sender: at most ``ALERT_BURST`` messages per (type, kind) per window.

    Windows are rows (``AlertWindow``), so the limit holds across passes and
    processes; only the one active detector writes them. Call :meth:`flush`
    at the end of a pass: windows that ended with suppressed messages send
    their summary and close.
    """

    def __init__(self) -> None:
        cfg = settings.SAGAADMIN
        self.burst = cfg["ALERT_BURST"]
        self.window = timedelta(seconds=cfg["ALERT_WINDOW_SECONDS"])
        self.windows = {(w.saga_type, w.kind): w for w in AlertWindow.objects.all()}
        self.dirty: set[tuple[str, str]] = set()

    def send(self, incident: Incident, event: str, now: datetime) -> bool:
        """Publish the message, or count it into the window's summary. True if published."""
        key = (incident.saga_type, incident.kind)
        window = self.windows.get(key)
        if window is None or now - window.started_at >= self.window:
            if window is not None and window.suppressed:
                self._summary(window, now)
            window = self.windows[key] = AlertWindow(
                pk=window.pk if window else None,
                saga_type=incident.saga_type,
                kind=incident.kind,
                started_at=now,
            )
        self.dirty.add(key)
        if window.sent < self.burst:
            window.sent += 1
            alert_publish(incident, event)
            return True
        window.suppressed[event] = window.suppressed.get(event, 0) + 1
        return False

    def flush(self, now: datetime) -> int:
        """Send the summaries of ended windows; save the windows. Returns summaries sent."""
        sent = 0
        for key, window in list(self.windows.items()):
            if now - window.started_at >= self.window and window.suppressed:
                self._summary(window, now)
                window.started_at, window.sent, window.suppressed = now, 0, {}
                self.dirty.add(key)
                sent += 1
        for key in sorted(self.dirty):
            self.windows[key].save()
        self.dirty.clear()
        return sent

    def _summary(self, window: AlertWindow, now: datetime) -> None:
        outbox.publish(
            topic=TOPIC,
            key=f"{window.saga_type}/{window.kind}",
            type="sagaadmin.incident.summary",
            payload={
                "event": "summary",
                "saga_type": window.saga_type,
                "kind": window.kind,
                "window_start": window.started_at.isoformat(),
                "window_end": now.isoformat(),
                "sent": window.sent,
                "suppressed": dict(sorted(window.suppressed.items())),
                "incidents_url": f"/incidents/?kind={window.kind}&saga_type={window.saga_type}",
            },
        )


def _note(note: object, *, required: bool) -> str:
    if note is not None and not isinstance(note, str):
        raise IncidentRefused("note", "text", status=400)
    note = (note or "").strip()
    if required and not note:
        raise IncidentRefused("note", "say how it was resolved (a note is required)", status=400)
    if len(note) > NOTE_MAX:
        raise IncidentRefused("note", f"at most {NOTE_MAX} characters", status=400)
    return note


def _locked(incident_id: int) -> Incident:
    """The incident with its saga row locked (saga first: the order every writer uses)."""
    saga_pk = Incident.objects.filter(pk=incident_id).values_list("saga_id", flat=True).first()
    if saga_pk is None:
        raise Incident.DoesNotExist(f"no incident {incident_id}")
    Saga.objects.select_for_update().filter(pk=saga_pk).values_list("pk").get()
    return Incident.objects.select_for_update().select_related("saga").get(pk=incident_id)


# what incident handling writes to the audit log's "action"
AUDIT_ACKNOWLEDGE, AUDIT_RESOLVE = "acknowledge_incident", "resolve_incident"


def incident_acknowledge(*, incident_id: int, user: str, note: str = "") -> Incident:
    """An operator has seen it and is on it. Refused once resolved; idempotent when acknowledged."""
    note = _note(note, required=False)
    with transaction.atomic():
        incident = _locked(incident_id)
        if incident.is_resolved:
            raise IncidentRefused("status", "the incident is resolved already")
        if incident.status == IncidentStatus.ACKNOWLEDGED:
            return incident
        before = incident.status
        incident.status = IncidentStatus.ACKNOWLEDGED
        incident.acknowledged_at = timezone.now()
        incident.acknowledged_by = user
        incident.acknowledge_note = note
        incident.save(
            update_fields=["status", "acknowledged_at", "acknowledged_by", "acknowledge_note"]
        )
        _saga_touched(incident.saga)
        _audit(incident, AUDIT_ACKNOWLEDGE, user, note, before)
        alert_publish(incident, "acknowledged")
    return incident


def incident_resolve(*, incident_id: int, user: str, note: str) -> Incident:
    """An operator closes it with a note. The detector will not reopen it on the same evidence."""
    note = _note(note, required=True)
    with transaction.atomic():
        incident = _locked(incident_id)
        if incident.is_resolved:
            raise IncidentRefused("status", "the incident is resolved already")
        before = incident.status
        incident_close(incident, at=timezone.now(), by=user, resolution="operator", note=note)
        incident.save()
        saga = incident.saga
        kinds = [k for k in split_delimited(saga.open_incidents) if k != incident.kind]
        _saga_touched(saga, open_incidents=join_delimited(kinds))
        _audit(incident, AUDIT_RESOLVE, user, note, before)
        alert_publish(incident, "resolved")
    return incident


def _audit(incident: Incident, action: str, user: str, note: str, before: str) -> None:
    """Operators' incident changes go to the audit log like every action."""
    AuditEntry.objects.create(
        actor=user,
        action=action,
        saga_id=incident.saga.saga_id,
        step=incident.step,
        reason=note,
        outcome="done",
        detail=f"incident {incident.pk} ({incident.kind})",
        state_before={"incident": incident.kind, "status": before},
        state_after={"incident": incident.kind, "status": incident.status},
    )


def _saga_touched(saga: Saga, **changes: str) -> None:
    """The saga's page shows its incidents: a new version makes open pages refresh it
    (``changes``: other columns written in the same UPDATE)."""
    saga.version += 1
    Saga.objects.filter(pk=saga.pk).update(version=saga.version, **changes)
    notify_sagas_changed(versions=[(saga.saga_id, saga.version)])


def incident_close(
    incident: Incident, *, at: datetime, by: str, resolution: str, note: str
) -> None:
    incident.status = IncidentStatus.RESOLVED
    incident.resolved_at = at
    incident.resolved_by = by
    incident.resolution = resolution
    incident.resolution_note = note
