"""Telemetry ingest: validate, deduplicate, append to the event store, project.

:func:`events_ingest` is the one entry point. The REST endpoint calls it, and so
(in-process, in its own transaction) does the orchestrator: every saga looks
the same whichever way it was reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from django.conf import settings
from django.db import connection, transaction

from sagaadmin import telemetry
from tracking import fold_cache
from tracking.bulk import fetch_later, in_pipeline, insert_new_later
from tracking.models import Saga, SagaStatus, Service, TelemetryEvent
from tracking.projection import FoldEvent
from tracking.protocol import (
    EventRejected,
    EventV1,
    FieldError,
    clean_payload,
    content_hash,
    decode_event,
    event_from_dict,
    normalise_times,
    redact,
    redact_keys,
)
from tracking.read_model import (
    ReadModelWrites,
    read_model_create_later,
    read_model_extend,
    read_model_refold,
    stored_events_get,
)

# An event as JSON bytes (the API) or as a dict built in this process (the OTLP mapping).
RawEvent = msgspec.Raw | bytes | dict[str, Any]

log = logging.getLogger(__name__)
ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"


@dataclass(frozen=True, slots=True)
class EventResult:
    index: int
    id: str | None
    status: str
    errors: tuple[FieldError, ...] = ()
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"index": self.index, "id": self.id, "status": self.status}
        if self.errors:
            out["errors"] = [{"field": e.field, "message": e.message} for e in self.errors]
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True, slots=True)
class IngestResult:
    results: list[EventResult]
    sagas_changed: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)


@dataclass(slots=True)
class _Valid:
    index: int
    event: EventV1
    hash: str
    warnings: tuple[str, ...]


def _validate(
    raws: Sequence[RawEvent], service: Service
) -> tuple[list[_Valid], dict[int, EventResult]]:
    cfg = settings.SAGAADMIN
    secret_keys = redact_keys()
    valid: list[_Valid] = []
    results: dict[int, EventResult] = {}
    seen: dict[str, _Valid] = {}
    for index, raw in enumerate(raws):
        event_id = None
        try:
            event = event_from_dict(raw) if isinstance(raw, dict) else decode_event(raw)
            event_id = event.id
            if event.service and event.service != service.name:
                raise EventRejected(
                    "service", f"this key reports for '{service.name}' only, not '{event.service}'"
                )
            payload, warning = clean_payload(
                event.payload,
                max_bytes=cfg["PAYLOAD_MAX_BYTES"],
                max_depth=cfg["PAYLOAD_MAX_DEPTH"],
                redact_keys=secret_keys,
            )
            # attributes are searchable business keys (flat scalars): a secret never
            # belongs there; most events have none to redact, so look before copying
            attributes = event.attributes
            if any(k.lower() in secret_keys for k in attributes):
                attributes = redact(attributes, secret_keys)
            event = msgspec.structs.replace(
                normalise_times(event), service=service.name, payload=payload, attributes=attributes
            )
            item = _Valid(index, event, content_hash(event), (warning,) if warning else ())
        except EventRejected as exc:
            results[index] = EventResult(index, event_id or exc.event_id, REJECTED, (exc.error,))
            continue
        first = seen.get(event.id)
        if first is None:
            seen[event.id] = item
            valid.append(item)
        elif first.hash == item.hash:
            results[index] = EventResult(index, event.id, DUPLICATE)
        else:
            results[index] = _conflict(index, event.id, f"event {first.index} of this batch")
    return valid, results


def _conflict(index: int, event_id: str, where: str) -> EventResult:
    return EventResult(
        index,
        event_id,
        REJECTED,
        (
            FieldError(
                "id", f"already used by {where} with different content; the original is kept"
            ),
        ),
    )


def events_ingest(
    *, service: Service, raws: Sequence[RawEvent], received_at: datetime | None = None
) -> IngestResult:
    """Ingest raw protocol events reported by ``service``, in one transaction.

    Joins the caller's transaction when there is one (the orchestrator reports
    in the transaction of its own transition). Writes and locks in one order
    in every transaction, so concurrent batches never deadlock (see
    ``_store_and_project``).
    """
    received_at = (received_at or datetime.now(UTC)).astimezone(UTC)
    with telemetry.span("ingest batch", service=service.name, events=len(raws)):
        return _ingest(service, raws, received_at)


def _ingest(service: Service, raws: Sequence[RawEvent], received_at: datetime) -> IngestResult:
    valid, results = _validate(raws, service)
    changed: list[str] = []
    if valid:
        with (
            transaction.atomic(savepoint=False),
            telemetry.span("projection", service=service.name, events=len(valid)),
        ):
            changed = _store_and_project(service, valid, received_at, results)
            if changed:
                transaction.on_commit(lambda: service_touch(service=service, at=received_at))
            answers = [
                v.event
                for v in valid
                if v.event.attributes.get("command_id") and results[v.index].status == ACCEPTED
            ]
            if answers:
                transaction.on_commit(lambda: command_answers_forward(answers), robust=True)
    return IngestResult([results[i] for i in range(len(raws))], changed)


# A service answers a command (an orchestrator step's, or an operator action's)
# by reporting events with ``attributes.command_id`` (docs/orchestrator.md,
# docs/operations.md). These outcomes complete an orchestrator step:
REPLY_EVENT_TYPES = frozenset(
    {
        "step.succeeded",
        "step.failed",
        "step.timed_out",
        "compensation.succeeded",
        "compensation.failed",
    }
)


def command_answers_forward(events: list[EventV1]) -> None:
    """After commit (never inside ingest's locks): hand command outcomes to the orchestrator
    and to the operator actions waiting for them."""
    from orchestrator.engine import step_reply
    from tracking.actions import action_progress

    for e in events:
        command_id = str(e.attributes["command_id"])
        error = msgspec.to_builtins(e.error) if e.error is not None else None
        try:
            if e.type in REPLY_EVENT_TYPES:
                step_reply(command_id=command_id, ok=e.type.endswith(".succeeded"), error=error)
            action_progress(command_id=command_id, event_type=e.type, error=error)
        except Exception:  # the events are stored; a remote step falls back on its timeout
            log.exception("ingest: could not forward the answer to command %s", command_id)


@dataclass(frozen=True, slots=True)
class LockedSaga:
    """The columns of a locked saga row that re-folding needs (cheaper than a model)."""

    pk: int
    saga_id: str
    version: int
    event_count: int
    saga_type: str
    status: str
    flags: str
    started_at: datetime | None
    open_incidents: str


SERVICE_TOUCH_RESOLUTION = timedelta(seconds=1)


def service_touch(*, service: Service, at: datetime) -> None:
    """Record when the service last reported, at most once a second per process.

    Runs after commit and outside the ingest transaction, so the hot
    ``Service`` row is never locked by ingest batches.
    """
    if service.last_event_at is None or at - service.last_event_at >= SERVICE_TOUCH_RESOLUTION:
        Service.objects.filter(pk=service.pk).update(last_event_at=at)
        service.last_event_at = at


def _store_and_project(
    service: Service, valid: list[_Valid], received_at: datetime, results: dict[int, EventResult]
) -> list[str]:
    """Store the events, then project the sagas they belong to.

    Order of writes, the same in every transaction (so none deadlock): events
    by event id, then rows of new sagas by saga id, then locks on the other
    sagas by saga id. The lock comes before the saga's events are re-read, so
    a concurrent batch for the same saga folds after this one commits and
    sees its events.

    The rows of new sagas are folded assuming every event of the batch is new
    (the usual case). That is safe: a saga without a row has no stored event
    (both commit together), so a saga this transaction creates has only new
    events. In pipeline mode (the fast path's small group commits) the event
    INSERT, the saga INSERT and the lock of every saga of the batch (after the
    INSERT, so in the same order) wait for the server together, once.
    """
    valid.sort(key=lambda v: v.event.id)
    batch: dict[str, list[FoldEvent]] = {}
    for v in valid:
        batch.setdefault(v.event.saga_id, []).append(_fold_event(v.event, received_at))
    # rollup deltas and notifications of both kinds, written once; the folds
    # written, kept for the sagas' next events (tracking/fold_cache.py)
    writes = ReadModelWrites(folds=[] if fold_cache.folds.size > 0 else None)
    together = in_pipeline()
    stored_later = _insert_events_later(service, valid, received_at)
    # Sagas seen for the first time: their rows straight from this batch's events,
    # inserted in saga-id order. Sagas whose fold this process keeps have a row: they
    # are not folded for this, only sent along as empty rows, which are stored only
    # if their row is gone (then re-folded from the store below).
    kept = {s for s in batch if s in fold_cache.folds}
    created_later = read_model_create_later(
        events={s: e for s, e in batch.items() if s not in kept},
        writes=writes,
        placeholders=kept,
    )
    locked_later = _sagas_lock_later(sorted(batch)) if together else None
    inserted = set(stored_later())
    created = created_later()
    rest = [v for v in valid if v.event.id not in inserted]
    existing = (
        dict(
            TelemetryEvent.objects.filter(
                service=service, event_id__in=[v.event.id for v in rest]
            ).values_list("event_id", "content_hash")
        )
        if rest
        else {}
    )
    new_by_saga: dict[str, list[FoldEvent]] = {}
    for v in valid:
        if v.event.id in inserted:
            results[v.index] = EventResult(v.index, v.event.id, ACCEPTED, warnings=v.warnings)
        elif existing.get(v.event.id) == v.hash:
            results[v.index] = EventResult(v.index, v.event.id, DUPLICATE)
        else:
            results[v.index] = _conflict(v.index, v.event.id, "an event stored earlier")
    for saga_id, events in batch.items():
        new = [e for e in events if e.event_id in inserted]
        if new:
            new_by_saga[saga_id] = new
    # The others: lock their rows (done above in pipeline mode); extend the folds kept
    # from their last events, or re-read every stored event and re-fold.
    known = sorted(s for s in new_by_saga if s not in created and s not in writes.revived)
    if locked_later is not None:
        locked = locked_later()
        sagas = {s: locked[s] for s in known if s in locked}
    else:
        sagas = _sagas_lock_later(known)() if known else {}
    for saga_id, pk in writes.revived.items():  # inserted (so locked) by this transaction
        sagas[saga_id] = LockedSaga(pk, saga_id, 0, 0, "", SagaStatus.RUNNING, "", None, "")
    if sagas:
        unkept = read_model_extend(sagas=sagas, events=new_by_saga, writes=writes)
        if unkept:
            read_model_refold(
                sagas={s: sagas[s] for s in unkept},
                events=stored_events_get(saga_ids=unkept),
                writes=writes,
            )
    if new_by_saga or writes.revived:
        writes.write()
    return sorted(new_by_saga)


_LOCK_COLUMNS = ", ".join(
    "id" if name == "pk" else name for name in LockedSaga.__dataclass_fields__
)


def _sagas_lock_later(saga_ids: list[str]) -> Callable[[], dict[str, LockedSaga]]:
    """Lock these saga rows in saga-id order (the order every saga write takes); the
    returned function gives them by saga id.

    One prepared statement on PostgreSQL (ingest runs it on every batch)."""
    if connection.vendor == "postgresql":
        later = fetch_later(
            f"SELECT {_LOCK_COLUMNS} FROM {Saga._meta.db_table} "  # noqa: S608
            "WHERE saga_id = ANY(%b::text[]) ORDER BY saga_id FOR UPDATE",
            [saga_ids],
        )
        return lambda: {row[1]: LockedSaga(*row) for row in later()}
    rows = list(
        Saga.objects.select_for_update()
        .filter(saga_id__in=saga_ids)
        .order_by("saga_id")
        .values_list(*LockedSaga.__dataclass_fields__)
    )
    locked = {row[1]: LockedSaga(*row) for row in rows}
    return lambda: locked


def _fold_event(e: EventV1, received_at: datetime) -> FoldEvent:
    return FoldEvent(
        service=e.service,
        event_id=e.id,
        type=e.type,
        occurred_at=e.occurred_at.astimezone(UTC),
        received_at=received_at,
        saga_type=e.saga_type,
        step=e.step,
        attempt=e.attempt,
        sequence=e.sequence,
        deadline=e.deadline.astimezone(UTC) if e.deadline else None,
        idempotency_key=e.idempotency_key,
        error=msgspec.to_builtins(e.error) if e.error is not None else None,
        attributes=e.attributes,
        trace_id=e.trace_id,
    )


_COLUMNS = (
    "service",
    "event_id",
    "protocol_version",
    "saga_id",
    "saga_type",
    "type",
    "step",
    "attempt",
    "occurred_at",
    "received_at",
    "sequence",
    "deadline",
    "idempotency_key",
    "message",
    "error",
    "attributes",
    "payload",
    "trace_id",
    "span_id",
    "content_hash",
)


def _insert_events_later(
    service: Service, valid: list[_Valid], received_at: datetime
) -> Callable[[], list[str]]:
    """Store the events; the returned function gives the ids this call stored (the
    rest already existed)."""
    rows = []
    for v in valid:
        e = v.event
        rows.append(
            (
                service.pk,
                e.id,
                e.version,
                e.saga_id,
                e.saga_type,
                e.type,
                e.step,
                e.attempt,
                e.occurred_at,
                received_at,
                e.sequence,
                e.deadline,
                e.idempotency_key,
                msgspec.to_builtins(e.message) if e.message is not None else None,
                msgspec.to_builtins(e.error) if e.error is not None else None,
                e.attributes,
                e.payload,
                e.trace_id,
                e.span_id,
                v.hash,
            )
        )
    return insert_new_later(
        TelemetryEvent, _COLUMNS, rows, conflict=("service", "event_id"), key="event_id"
    )
