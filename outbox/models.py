"""The outbox table, shaped for Debezium's outbox event router.

Columns ``id``, ``aggregatetype``, ``aggregateid``, ``type``, ``payload`` are
the router's defaults, so a team can drain this table with CDC instead of the
relay. ``seq`` (the primary key, a database sequence) orders messages: within
a key it is commit order, because ``publish()`` serialises a key's writers.
"""

from __future__ import annotations

from django.db import models

from outbox.ids import uuid7


class Status(models.TextChoices):
    PENDING = "pending"
    PUBLISHED = "published"
    DEAD = "dead"


class OutboxMessage(models.Model):
    seq = models.BigAutoField(primary_key=True)
    message_id = models.UUIDField(db_column="id", unique=True, default=uuid7, editable=False)
    aggregatetype = models.CharField("topic", max_length=200)
    aggregateid = models.CharField("ordering key", max_length=200)
    type = models.CharField(max_length=200)
    version = models.PositiveIntegerField(default=1)
    # The canonical JSON text, encoded once by publish() and sent as is.
    payload = models.TextField()
    headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    available_at = models.DateTimeField()
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    published_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)

    class Meta:
        indexes = [
            # the relay's claim: pending rows in sequence order
            models.Index(
                fields=["seq"], condition=models.Q(status="pending"), name="outbox_pending_idx"
            ),
            # "is an earlier message of this key still pending?"
            models.Index(
                fields=["aggregatetype", "aggregateid", "seq"],
                condition=models.Q(status="pending"),
                name="outbox_pending_key_idx",
            ),
            # "is an earlier message of this key waiting for a retry?" (few rows)
            models.Index(
                fields=["available_at"],
                condition=models.Q(status="pending"),
                name="outbox_pending_due_idx",
            ),
            models.Index(fields=["status", "published_at"], name="outbox_status_idx"),
        ]

    def __str__(self) -> str:
        return (
            f"{self.aggregatetype}/{self.aggregateid} {self.type} v{self.version} ({self.status})"
        )


class InboxMessage(models.Model):
    """A message a consumer has applied: (consumer, message id) once, ever.

    Written in the same transaction as the consumer's own changes, so a
    redelivered message finds its row and changes nothing (``outbox.inbox``).
    """

    consumer = models.CharField(max_length=200)
    message_id = models.CharField(max_length=200)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["consumer", "message_id"], name="inbox_once")
        ]

    def __str__(self) -> str:
        return f"{self.consumer}: {self.message_id}"
