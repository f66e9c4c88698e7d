"""Output shapes of the read API (DRF serializers, read-only)."""

from __future__ import annotations

from datetime import timedelta

from rest_framework import serializers

from tracking.models import Saga, Step, TelemetryEvent
from tracking.selectors import EventRow


class StepSerializer(serializers.ModelSerializer):
    class Meta:
        model = Step
        fields = [
            "name",
            "position",
            "service",
            "status",
            "attempt",
            "started_at",
            "ended_at",
            "duration_ms",
            "deadline",
            "last_error",
            "idempotency_key",
            "compensation_attempt",
            "attempts",
        ]


class SagaSerializer(serializers.ModelSerializer):
    flags = serializers.ListField(source="flag_list", child=serializers.CharField())
    services = serializers.ListField(source="service_list", child=serializers.CharField())

    class Meta:
        model = Saga
        fields = [
            "saga_id",
            "saga_type",
            "status",
            "current_step",
            "started_at",
            "ended_at",
            "last_event_at",
            "last_received_at",
            "duration_ms",
            "deadline",
            "last_error",
            "idempotency_key",
            "attributes",
            "services",
            "trace_ids",
            "flags",
            "anomalies",
            "event_count",
            "version",
        ]


class SagaDetailSerializer(SagaSerializer):
    steps = StepSerializer(many=True, read_only=True)

    class Meta(SagaSerializer.Meta):
        fields = [*SagaSerializer.Meta.fields, "steps"]


class EventSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="event_id")
    service = serializers.CharField(source="service_name")
    version = serializers.IntegerField(source="protocol_version")
    skew_ms = serializers.SerializerMethodField()

    class Meta:
        model = TelemetryEvent
        fields = [
            "id",
            "version",
            "saga_id",
            "saga_type",
            "type",
            "step",
            "attempt",
            "service",
            "occurred_at",
            "received_at",
            "skew_ms",
            "sequence",
            "deadline",
            "idempotency_key",
            "message",
            "error",
            "attributes",
            "payload",
            "trace_id",
            "span_id",
        ]

    def get_skew_ms(self, event: EventRow) -> int:
        """Reporter clock minus server receive time, in milliseconds."""
        return int((event.occurred_at - event.received_at) / timedelta(milliseconds=1))
