"""Durable orchestrator state: one ``SagaRun`` per saga, one ``StepRun`` per step.

Every transition (tracking the engine in orchestrator/engine.py) is one
transaction that changes these rows, reports the saga's telemetry and writes
its outbox messages together. ``next_run_at`` says when a worker must advance
the run (NULL: nothing to do until a reply or an operator arrives); the lease
columns say which worker holds it.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class RunStatus(models.TextChoices):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    FAILED = "failed"  # a step failed for good and nothing was there to compensate
    TERMINATED = "terminated"  # stopped by an operator without compensating


TERMINAL_RUN_STATUSES = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.COMPENSATED,
        RunStatus.COMPENSATION_FAILED,
        RunStatus.FAILED,
        RunStatus.TERMINATED,
    }
)


class StepRunStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"  # a remote command is out, waiting for the reply
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


class SagaRun(models.Model):
    saga_id = models.CharField(max_length=200, unique=True)
    saga_type = models.CharField(max_length=100)
    status = models.CharField(max_length=24, choices=RunStatus.choices, default=RunStatus.RUNNING)
    paused = models.BooleanField(default=False)
    # Why the run is not advancing right now ("retry 2 of charge at ...", "circuit open").
    waiting = models.CharField(max_length=300, blank=True)
    data = models.JSONField(default=dict)
    results = models.JSONField(default=dict)  # step name -> the action's return value
    # Grows with every operator retry: part of every idempotency key, so a retry
    # after an operator decision is a new operation downstream.
    epoch = models.PositiveIntegerField(default=1)
    # Grows with every transition; operators' hooks check it (409 on a stale one).
    version = models.PositiveBigIntegerField(default=1)
    next_run_at = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=100, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    # Fencing token: grows with every claim; a transition of an older claim is refused.
    lease_token = models.PositiveBigIntegerField(default=0)
    # The reporter sequence of the saga's telemetry (the orchestrator is its one reporter).
    report_seq = models.PositiveBigIntegerField(default=0)
    # The W3C trace context the saga was started in: every transition continues it.
    traceparent = models.CharField(max_length=100, blank=True, default="")
    last_error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [("start_saga", "Can start orchestrated sagas")]
        indexes = [
            models.Index(
                fields=["next_run_at"],
                condition=models.Q(next_run_at__isnull=False),
                name="run_due_idx",
            ),
            # The runs not finished (the dashboard's list), newest first.
            models.Index(
                fields=["-created_at", "-id"],
                condition=models.Q(status__in=["running", "compensating"]),
                name="run_open_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.saga_type}:{self.saga_id}"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_RUN_STATUSES


class StepRun(models.Model):
    run = models.ForeignKey(SagaRun, on_delete=models.CASCADE, related_name="steps")
    name = models.CharField(max_length=100)
    position = models.PositiveSmallIntegerField()
    kind = models.CharField(max_length=8)
    status = models.CharField(
        max_length=24, choices=StepRunStatus.choices, default=StepRunStatus.PENDING
    )
    attempt = models.PositiveIntegerField(default=0)
    compensation_attempt = models.PositiveIntegerField(default=0)
    # Attempts made before the current epoch: an operator's retry gives the step
    # its whole retry budget again while attempt numbers keep growing.
    attempt_base = models.PositiveIntegerField(default=0)
    compensation_base = models.PositiveIntegerField(default=0)
    # The epoch of the current attempt (its idempotency key's epoch).
    epoch = models.PositiveIntegerField(default=1)
    # tcc: "", "prepared", "committed", "rolled_back"
    tx_state = models.CharField(max_length=12, blank=True)
    # remote: the command now out; a reply naming another id is late and ignored.
    command_id = models.CharField(max_length=64, blank=True, db_index=True)
    deadline = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    last_error = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "name"], name="steprun_unique_per_run")
        ]
        ordering = ["position"]

    def __str__(self) -> str:
        return f"{self.run_id}:{self.name}"


class Circuit(models.Model):
    """A circuit breaker per target service of remote steps (orchestrator/circuit.py)."""

    service = models.CharField(max_length=100, unique=True)
    state = models.CharField(max_length=10, default="closed")  # closed, open, half_open
    failures = models.PositiveIntegerField(default=0)  # consecutive
    opened_at = models.DateTimeField(null=True, blank=True)
    retry_at = models.DateTimeField(null=True, blank=True)  # open: when a probe may go
    probe_command_id = models.CharField(max_length=64, blank=True)

    def __str__(self) -> str:
        return f"{self.service}: {self.state}"
