"""The detector pass: due sagas -> rules -> incidents and alerts (docs/detection.md).

Incremental: it reads only sagas whose ``watch_at`` has come (a partial index
holds just those rows), in batches. Projection sets ``watch_at`` when new
events may open or close an incident, or to the time a waiting rule could
fire; after looking at a saga the detector sets it to the next such time, or
NULL. A settled, terminal saga never costs the detector anything.

One active detector at a time: on PostgreSQL a pass holds an advisory lock,
so any number of ``run_worker`` processes can run it; the others skip.
Saga rows are locked with ``SKIP LOCKED`` in saga-id order, the order
ingest locks them in: a saga being ingested right now is skipped (it stays
due) and nothing ever waits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from django.db import DatabaseError, connection, connections, transaction
from django.db.models import Q
from django.utils import timezone

from tracking.actions import actions_overdue_mark
from tracking.bulk import update_rows
from tracking.detection import Facts, Finding, evaluate, next_check
from tracking.incidents import Alerts, incident_close
from tracking.live import notify_sagas_changed
from tracking.models import Incident, IncidentStatus, Saga, join_delimited
from tracking.policy import Policy, policy_load
from tracking.projection import SagaState, fold, order_events
from tracking.read_model import skew_threshold, stored_events_get

log = logging.getLogger(__name__)
LOCK_KEY = 0x5A6A_0002
_local_lock = threading.Lock()  # SQLite: one detector per process is all there is


@dataclass(slots=True)
class PassResult:
    ran: bool = True  # False: another detector holds the lock
    examined: int = 0
    skipped: int = 0  # locked by ingest right now; still due
    opened: int = 0
    resolved: int = 0
    summaries: int = 0
    actions_timed_out: int = 0  # operator actions whose command got no answer in time
    seconds: float = 0.0

    def __str__(self) -> str:
        if not self.ran:
            return "detector: another detector is active, skipped"
        return (
            f"detector: examined {self.examined} sagas in {self.seconds:.3f} s, "
            f"opened {self.opened}, resolved {self.resolved} incidents"
            + (f", {self.skipped} busy (next pass)" if self.skipped else "")
            + (f", {self.summaries} alert summaries" if self.summaries else "")
            + (
                f", {self.actions_timed_out} operator actions timed out"
                if self.actions_timed_out
                else ""
            )
        )


@contextlib.contextmanager
def detector_lock() -> Iterator[bool]:
    """Yields True when this process is the active detector for the pass."""
    if connection.vendor != "postgresql":
        got = _local_lock.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                _local_lock.release()
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
        got = bool(cursor.fetchone()[0])
    try:
        yield got
    finally:
        if got:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])


def detect_pass(
    *, now: datetime | None = None, batch_size: int = 500, policy: Policy | None = None
) -> PassResult:
    """Look at every due saga once; open, keep or resolve its incidents."""
    started = time.perf_counter()
    now = now or timezone.now()
    result = PassResult()
    with detector_lock() as active:
        if not active:
            return PassResult(ran=False)
        policy = policy or policy_load(now=now)
        alerts = Alerts()
        after: tuple[datetime | None, int] | None = None
        while True:
            due = Saga.objects.filter(watch_at__lte=now)
            if after is not None:
                due = due.filter(Q(watch_at__gt=after[0]) | Q(watch_at=after[0], pk__gt=after[1]))
            batch = list(due.order_by("watch_at", "pk").values_list("watch_at", "pk")[:batch_size])
            if not batch:
                break
            after = batch[-1]
            with transaction.atomic():
                _batch(
                    [pk for _, pk in batch], now=now, policy=policy, alerts=alerts, result=result
                )
        with transaction.atomic():
            result.summaries = alerts.flush(now)
        result.actions_timed_out = actions_overdue_mark(now=now)
    result.seconds = time.perf_counter() - started
    return result


def _batch(
    pks: list[int], *, now: datetime, policy: Policy, alerts: Alerts, result: PassResult
) -> None:
    sagas = list(
        Saga.objects.select_for_update(skip_locked=True)
        .filter(pk__in=pks, watch_at__lte=now)
        .order_by("saga_id")
        .only("pk", "saga_id", "saga_type", "version", "open_incidents", "watch_at")
    )
    result.skipped += len(pks) - len(sagas)
    if not sagas:
        return
    by_pk = {s.pk: s for s in sagas}
    events = stored_events_get(saga_ids=[s.saga_id for s in sagas])
    unresolved: dict[tuple[int, str], Incident] = {}
    for incident in Incident.objects.filter(saga_id__in=by_pk, resolved_at__isnull=True):
        incident.saga = by_pk[incident.saga_id]
        unresolved[(incident.saga_id, incident.kind)] = incident
    settled = _operator_settled(list(by_pk))
    threshold = skew_threshold()
    new: list[Incident] = []
    closed: list[Incident] = []
    changed: list[Saga] = []
    bumped: list[tuple[str, int]] = []
    for saga in sagas:
        saga_events = order_events(events.get(saga.saga_id, ()))
        state = fold(saga.saga_id, saga_events, skew_threshold=threshold)
        findings = evaluate(Facts(state, saga_events, policy, now))
        kinds: set[str] = set()
        for kind, finding in findings.items():
            if (saga.pk, kind) in unresolved:
                kinds.add(kind)
            elif not _evidence_ids(finding) <= settled.get((saga.pk, kind), set()):
                new.append(_incident(saga, finding, now))
                kinds.add(kind)
        for (pk, kind), incident in unresolved.items():
            if pk == saga.pk and kind not in findings:
                incident_close(
                    incident, at=now, by="detector", resolution="auto", note=_moved_on(state)
                )
                closed.append(incident)
        flags = join_delimited(sorted(kinds))
        if flags != saga.open_incidents:  # its badges change: live pages refresh it
            saga.version += 1
            bumped.append((saga.saga_id, saga.version))
        saga.open_incidents = flags
        saga.watch_at = next_check(state, policy, after=now)
        changed.append(saga)
    result.examined += len(sagas)
    if new:
        Incident.objects.bulk_create(new)
    if closed:
        Incident.objects.bulk_update(
            closed, ["status", "resolved_at", "resolved_by", "resolution", "resolution_note"]
        )
    update_rows(
        Saga,
        ["id", "open_incidents", "watch_at", "version"],
        [(s.pk, s.open_incidents, s.watch_at, s.version) for s in changed],
    )
    for incident in new:
        alerts.send(incident, "opened", now)
    for incident in closed:
        alerts.send(incident, "resolved", now)
    result.opened += len(new)
    result.resolved += len(closed)
    notify_sagas_changed(versions=bumped)


def _incident(saga: Saga, finding: Finding, now: datetime) -> Incident:
    return Incident(
        saga=saga,
        saga_type=saga.saga_type,
        kind=finding.kind,
        status=IncidentStatus.OPEN,
        step=finding.step,
        reason=finding.reason,
        evidence=finding.evidence_json(),
        opened_at=now,
    )


def _evidence_ids(finding: Finding) -> set[str]:
    return {f"{e.service}/{e.event_id}" for e in finding.evidence}


def _operator_settled(saga_pks: list[int]) -> dict[tuple[int, str], set[str]]:
    """Evidence of the latest operator-resolved incident per (saga, kind).

    A finding on exactly that evidence (or less) does not reopen: the
    operator has looked at it. New evidence opens a new incident.
    """
    out: dict[tuple[int, str], set[str]] = {}
    rows = (
        Incident.objects.filter(saga_id__in=saga_pks, resolution="operator")
        .order_by("saga_id", "kind", "resolved_at")
        .values_list("saga_id", "kind", "evidence")
    )
    for saga_pk, kind, evidence in rows:  # later rows overwrite earlier ones
        out[(saga_pk, kind)] = {f"{e['service']}/{e['event_id']}" for e in evidence}
    return out


def _moved_on(state: SagaState) -> str:
    return f"the saga moved on (now {state.status}); the condition no longer holds"


def detect_loop(
    stop: threading.Event, *, interval: float, report: Callable[[PassResult], None] | None = None
) -> None:
    """A pass every ``interval`` seconds until ``stop`` is set; a failed pass is retried."""
    while not stop.is_set():
        try:
            result = detect_pass()
            if report is not None and (result.examined or result.opened or result.resolved):
                report(result)
        except DatabaseError as exc:
            log.warning("detector: pass failed, next one retries: %s", exc)
            connections.close_all()
        except Exception:  # a bug must not stop detection for good
            log.exception("detector: pass failed, next one retries")
        stop.wait(interval)
