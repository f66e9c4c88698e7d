"""Tracking models: the append-only event store and the read model built from it.

``TelemetryEvent`` is the source of truth and is never updated or deleted by
the product. ``Saga`` and ``Step`` are a projection of it
(:mod:`tracking.projection`): ``manage.py rebuild_read_model`` can recreate
them at any time and must reach the same rows ingest maintained incrementally.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


def join_delimited(items: list[str]) -> str:
    """``["a", "b"]`` -> ``",a,b,"``: one item is found with ``contains=",a,"``."""
    return f",{','.join(items)}," if items else ""


def split_delimited(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


class Service(models.Model):
    """A service that reports telemetry (one per deployable, e.g. ``payment``)."""

    name = models.SlugField(max_length=100, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_event_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [("manage_keys", "Can create and revoke service keys")]

    def __str__(self) -> str:
        return self.name


class ServiceKey(models.Model):
    """A bearer key a service reports with.

    The key is shown once at creation; only its lookup prefix and a SHA-256
    hash are stored (keys are 256-bit random tokens, so a fast hash is safe:
    there is nothing to brute-force, unlike a password).
    """

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True)
    hashed = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.service.name}:{self.prefix}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class TelemetryEvent(models.Model):
    """One report, stored as received (after validation, upcasting and redaction).

    Unique on ``(service, event_id)``: the reporter's id is the dedupe key.
    ``occurred_at`` is the reporter's clock, ``received_at`` the server's.
    """

    # No index of its own: (service, event_id) and (service, received_at) lead with it.
    service = models.ForeignKey(
        Service, on_delete=models.PROTECT, related_name="events", db_index=False
    )
    event_id = models.CharField(max_length=128)
    protocol_version = models.PositiveSmallIntegerField(default=1)
    saga_id = models.CharField(max_length=200)
    saga_type = models.CharField(max_length=100, blank=True)
    type = models.CharField(max_length=32)
    step = models.CharField(max_length=100, blank=True)
    attempt = models.PositiveIntegerField(default=1)
    occurred_at = models.DateTimeField()
    received_at = models.DateTimeField()
    sequence = models.BigIntegerField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, blank=True)
    message = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    attributes = models.JSONField(default=dict, blank=True)
    payload = models.JSONField(null=True, blank=True)
    trace_id = models.CharField(max_length=32, blank=True)
    span_id = models.CharField(max_length=16, blank=True)
    # SHA-256 of the canonical encoding: same id + same hash = duplicate,
    # same id + other hash = conflict (the original is kept).
    content_hash = models.CharField(max_length=64)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["service", "event_id"], name="event_unique_per_service"
            ),
        ]
        indexes = [
            models.Index(fields=["saga_id", "id"], name="event_saga_idx"),
            models.Index(fields=["service", "received_at"], name="event_service_recent_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.saga_id} ({self.event_id})"


class SagaStatus(models.TextChoices):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    CANCELLED = "cancelled"


TERMINAL_SAGA_STATUSES = frozenset(
    {
        SagaStatus.COMPLETED,
        SagaStatus.FAILED,
        SagaStatus.COMPENSATED,
        SagaStatus.COMPENSATION_FAILED,
        SagaStatus.CANCELLED,
    }
)


class StepStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


class Saga(models.Model):
    """Read model: one row per saga instance, a projection of its events."""

    saga_id = models.CharField(max_length=200, unique=True)
    saga_type = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=24, choices=SagaStatus.choices, default=SagaStatus.RUNNING)
    current_step = models.CharField(max_length=100, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    last_received_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.BigIntegerField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    last_error = models.JSONField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, blank=True)
    attributes = models.JSONField(default=dict, blank=True)
    # Delimited like ``flags`` (",order,payment,") for a portable "has service" filter.
    services = models.CharField(max_length=1000, blank=True, default="")
    trace_ids = models.JSONField(default=list, blank=True)
    # Sorted, comma-delimited with leading/trailing commas (",anomaly,clock_skew,")
    # so one flag is found with a substring match on every database.
    flags = models.CharField(max_length=200, blank=True, default="")
    anomalies = models.JSONField(default=list, blank=True)
    event_count = models.PositiveIntegerField(default=0)
    # Increases by one on every change of the projected state.
    version = models.PositiveBigIntegerField(default=0)
    # Detection (docs/detection.md). Kinds of the saga's open incidents, delimited
    # like ``flags``: the detector writes it, the list's flag filter reads it.
    open_incidents = models.CharField(max_length=200, blank=True, default="", db_default="")
    # When the detector must look at this saga next (NULL: only when it changes).
    # Projection sets it; the detector's pass reads the rows that are due.
    watch_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [
            ("act_on_saga", "Can run operator actions on sagas"),
            ("terminate_saga", "Can terminate sagas and edit saga data"),
        ]
        indexes = [
            models.Index(fields=["-started_at", "-id"], name="saga_started_idx"),
            models.Index(fields=["-last_event_at", "-id"], name="saga_activity_idx"),
            models.Index(fields=["status", "-started_at", "-id"], name="saga_status_idx"),
            models.Index(fields=["saga_type", "-started_at", "-id"], name="saga_type_idx"),
            # Flagged sagas are few: the flag filter walks this small index.
            models.Index(
                fields=["-started_at", "-id"],
                condition=~models.Q(flags=""),
                name="saga_flagged_idx",
            ),
            # Same for sagas with open incidents.
            models.Index(
                fields=["-started_at", "-id"],
                condition=~models.Q(open_incidents=""),
                name="saga_incident_idx",
            ),
            # The detector's queue: only sagas it must look at are in this index.
            models.Index(
                fields=["watch_at"],
                condition=models.Q(watch_at__isnull=False),
                name="saga_watch_idx",
            ),
        ]

    def __str__(self) -> str:
        return self.saga_id

    @property
    def flag_list(self) -> list[str]:
        return split_delimited(self.flags)

    @property
    def service_list(self) -> list[str]:
        return split_delimited(self.services)

    @property
    def incident_list(self) -> list[str]:
        return split_delimited(self.open_incidents)


class Step(models.Model):
    """Read model: one row per (saga, step name)."""

    # No index of its own: ``step_unique_per_saga`` (saga, name) serves lookups by saga.
    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="steps", db_index=False)
    name = models.CharField(max_length=100)
    position = models.PositiveIntegerField()
    service = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=24, choices=StepStatus.choices, default=StepStatus.PENDING)
    attempt = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.BigIntegerField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    last_error = models.JSONField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, blank=True)
    compensation_attempt = models.PositiveIntegerField(default=0)
    # Every attempt and compensation attempt: kind, attempt, start, end, outcome, error.
    attempts = models.JSONField(default=list, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["saga", "name"], name="step_unique_per_saga"),
        ]
        indexes = [models.Index(fields=["name", "status"], name="step_name_idx")]

    def __str__(self) -> str:
        return f"{self.saga_id}:{self.name}"


class _Rollup(models.Model):
    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.pk})"


class _SagaCountKey(_Rollup):
    """A saga-count bucket: (bucket start, saga type, status, flags)."""

    bucket = models.DateTimeField()
    saga_type = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=24)
    flags = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        abstract = True


class _StepStatKey(_Rollup):
    """A step-stat bucket: (bucket start, saga type, step, duration bin)."""

    bucket = models.DateTimeField()
    saga_type = models.CharField(max_length=100, blank=True)
    step = models.CharField(max_length=100)
    bin = models.SmallIntegerField()

    class Meta:
        abstract = True


class SagaCount(_SagaCountKey):
    """Rollup: sagas by (5-minute bucket of their start, type, current status).

    Maintained without hot rows: ingest appends ``SagaCountDelta`` rows and
    :func:`tracking.rollups.rollup_compact` folds them in (tracking/rollups.py).
    """

    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["bucket", "saga_type", "status", "flags"], name="saga_count_key"
            )
        ]


class SagaCountHour(_SagaCountKey):
    """``SagaCount`` summed by hour: long overview windows read ~12x fewer rows."""

    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["bucket", "saga_type", "status", "flags"], name="saga_count_hour_key"
            )
        ]


class SagaCountDelta(_SagaCountKey):
    delta = models.IntegerField()


class StepStat(_StepStatKey):
    """Rollup: finished forward step attempts by (hour of end, type, step, duration bin)."""

    count = models.BigIntegerField(default=0)
    failures = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["bucket", "saga_type", "step", "bin"], name="step_stat_key"
            )
        ]


class StepStatDay(_StepStatKey):
    """``StepStat`` summed by day (UTC), for the 7-day overview."""

    count = models.BigIntegerField(default=0)
    failures = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["bucket", "saga_type", "step", "bin"], name="step_stat_day_key"
            )
        ]


class StepStatDelta(_StepStatKey):
    count = models.IntegerField()
    failures = models.IntegerField()


class SagaType(models.Model):
    """A kind of saga (``order``), created on first sight; holds its detection thresholds.

    Empty thresholds fall back to the defaults in ``settings.SAGAADMIN``
    (docs/detection.md). ``step_thresholds`` maps a step name to seconds.
    """

    name = models.CharField(max_length=100, unique=True)
    stuck_after_seconds = models.PositiveIntegerField(null=True, blank=True)
    step_thresholds = models.JSONField(default=dict, blank=True)
    max_attempts = models.PositiveIntegerField(null=True, blank=True)
    in_doubt_after_seconds = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(null=True, blank=True)
    updated_by = models.CharField(max_length=150, blank=True)

    class Meta:
        permissions = [("edit_thresholds", "Can edit saga type thresholds")]

    def __str__(self) -> str:
        return self.name


class IncidentKind(models.TextChoices):
    STUCK = "stuck"
    COMPENSATION_FAILED = "compensation_failed"
    RETRIES_EXHAUSTED = "retries_exhausted"
    IN_DOUBT = "in_doubt"
    ANOMALY = "anomaly"


class IncidentStatus(models.TextChoices):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class Incident(models.Model):
    """Something about a saga an operator must look at; at most one unresolved per (saga, kind).

    Opened and auto-resolved by the detector, acknowledged and resolved by
    operators (tracking/incidents.py). ``evidence`` lists the events that
    triggered it: ``{"service", "event_id", "type", "step", "occurred_at"}``.
    """

    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="incidents")
    saga_type = models.CharField(max_length=100, blank=True)
    kind = models.CharField(max_length=24, choices=IncidentKind.choices)
    status = models.CharField(
        max_length=16, choices=IncidentStatus.choices, default=IncidentStatus.OPEN
    )
    step = models.CharField(max_length=100, blank=True)
    reason = models.TextField()
    evidence = models.JSONField(default=list)
    opened_at = models.DateTimeField()
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.CharField(max_length=150, blank=True)
    acknowledge_note = models.TextField(blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True)
    # "auto" (the saga moved on) or "operator"
    resolution = models.CharField(max_length=16, blank=True)
    resolution_note = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["saga", "kind"],
                condition=models.Q(resolved_at__isnull=True),
                name="incident_one_unresolved_per_kind",
            )
        ]
        indexes = [
            models.Index(fields=["status", "-opened_at", "-id"], name="incident_status_idx"),
            models.Index(fields=["-opened_at", "-id"], name="incident_opened_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.saga_id}"

    @property
    def is_resolved(self) -> bool:
        return self.resolved_at is not None


class AlertWindow(models.Model):
    """The alert rate limit's state for one (saga type, incident kind) (tracking/incidents.py)."""

    saga_type = models.CharField(max_length=100, blank=True)
    kind = models.CharField(max_length=24)
    started_at = models.DateTimeField()
    sent = models.PositiveIntegerField(default=0)
    # Messages folded into the window's summary, by incident event ("opened": 12).
    suppressed = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["saga_type", "kind"], name="alert_window_key")
        ]

    def __str__(self) -> str:
        return f"{self.saga_type}/{self.kind}"


class ActionStatus(models.TextChoices):
    REQUESTED = "requested"
    DISPATCHED = "dispatched"  # the command is in the outbox (external sagas)
    ACKNOWLEDGED = "acknowledged"  # the service reported an event naming the command
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # no answer within ACTION_TIMEOUT_SECONDS
    REFUSED = "refused"  # forbidden, stale version or not allowed in the saga's state
    AWAITING_APPROVAL = "awaiting_approval"  # the two-person rule: a second operator approves
    REJECTED = "rejected"  # ... or rejects it


class OperatorAction(models.Model):
    """One operator action on one saga and its progress (tracking/actions.py).

    ``request_id`` is the client's: resubmitting it returns ``response``, the
    first answer, and dispatches nothing again.
    """

    request_id = models.CharField(max_length=100, null=True, blank=True, unique=True)
    action = models.CharField(max_length=32)
    saga_id = models.CharField(max_length=200, db_index=True)
    step = models.CharField(max_length=100, blank=True)
    actor = models.CharField(max_length=150)
    reason = models.TextField()
    data = models.JSONField(null=True, blank=True)  # rerun with edited data
    status = models.CharField(max_length=20, choices=ActionStatus.choices)
    approved_by = models.CharField(max_length=150, blank=True)
    orchestrated = models.BooleanField(default=False)
    command_id = models.CharField(max_length=64, blank=True, db_index=True)
    service = models.CharField(max_length=100, blank=True)
    response = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["deadline"],
                condition=models.Q(status__in=["dispatched", "acknowledged"]),
                name="action_waiting_idx",
            )
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.saga_id} ({self.status})"


class AuditEntry(models.Model):
    """Append-only: who did what to which saga, why, and what came of it.

    On PostgreSQL a trigger refuses UPDATE and DELETE (migration 0013).
    """

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=150)
    role = models.CharField(max_length=16, blank=True)
    action = models.CharField(max_length=32)
    saga_id = models.CharField(max_length=200, db_index=True)
    step = models.CharField(max_length=100, blank=True)
    reason = models.TextField(blank=True)
    # done, dispatched, forbidden, conflict, refused, ...
    outcome = models.CharField(max_length=20)
    detail = models.TextField(blank=True)
    state_before = models.JSONField(null=True, blank=True)
    state_after = models.JSONField(null=True, blank=True)
    operator_action = models.ForeignKey(
        OperatorAction, null=True, blank=True, on_delete=models.PROTECT, related_name="audit"
    )

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.saga_id}"


class BulkJob(models.Model):
    """One action over the sagas a list filter matched (tracking/bulk_actions.py).

    The matching saga ids are fixed when the job starts (``BulkItem`` rows); the
    worker dispatches them at ``rate`` per second; it can be cancelled.
    """

    action = models.CharField(max_length=32)
    filters = models.JSONField(default=dict)  # the saga list's query parameters
    reason = models.TextField()
    actor = models.CharField(max_length=150)
    # awaiting_approval (the two-person rule), running, cancelled, done
    status = models.CharField(max_length=20, default="running")
    approved_by = models.CharField(max_length=150, blank=True)
    rate = models.FloatField(default=20.0)
    total = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"bulk {self.action} #{self.pk} ({self.status})"

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed


class BulkItem(models.Model):
    job = models.ForeignKey(BulkJob, on_delete=models.CASCADE, related_name="items")
    saga_id = models.CharField(max_length=200)
    # pending, done (the action was accepted), failed (refused: see result), cancelled
    status = models.CharField(max_length=12, default="pending")
    result = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "saga_id"], name="bulk_item_unique")]
        indexes = [
            models.Index(
                fields=["job", "id"], condition=models.Q(status="pending"), name="bulk_pending_idx"
            )
        ]

    def __str__(self) -> str:
        return f"{self.job_id}:{self.saga_id} {self.status}"
