"""Shapes of the API: read-only outputs, and the bodies of the incident and saga-type writes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.urls import reverse
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from tracking.incidents import NOTE_MAX
from tracking.models import Incident, Saga, Step, TelemetryEvent
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


# -- incidents and saga types ------------------------------------------------------


class ProblemFieldErrorSerializer(serializers.Serializer):
    field = serializers.CharField(help_text='the offending field, e.g. "note"')
    message = serializers.CharField()


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem details (``application/problem+json``), as every API error is served."""

    type = serializers.CharField(help_text="https://sagaadmin.dev/problems/<slug>")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()
    # DRF moves declared fields off the class: this does not hide Serializer.errors.
    errors = ProblemFieldErrorSerializer(many=True, required=False)  # type: ignore[assignment]


class _StoredDateTimeField(serializers.DateTimeField):
    """A time stored as ISO text in JSON (incident evidence), rendered like every other time."""

    def to_representation(self, value: Any) -> Any:
        if isinstance(value, str):
            value = parse_datetime(value) or value
        return super().to_representation(value)


class EvidenceSerializer(serializers.Serializer):
    service = serializers.CharField()
    event_id = serializers.CharField()
    type = serializers.CharField()
    step = serializers.CharField(allow_blank=True)
    occurred_at = _StoredDateTimeField()


class IncidentSerializer(serializers.ModelSerializer):
    saga_id = serializers.CharField(source="saga.saga_id")
    evidence = EvidenceSerializer(many=True)
    saga_url = serializers.SerializerMethodField()

    class Meta:
        model = Incident
        fields = [
            "id",
            "saga_id",
            "saga_type",
            "kind",
            "status",
            "step",
            "reason",
            "evidence",
            "opened_at",
            "acknowledged_at",
            "acknowledged_by",
            "acknowledge_note",
            "resolved_at",
            "resolved_by",
            "resolution",
            "resolution_note",
            "saga_url",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.URI)
    def get_saga_url(self, incident: Incident) -> str:
        """The saga in the read API (absolute when the serializer has the request)."""
        path = reverse("api-saga-detail", kwargs={"saga_id": incident.saga.saga_id})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class IncidentAcknowledgeSerializer(serializers.Serializer):
    note = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        help_text=f"optional, at most {NOTE_MAX} characters",
    )


class IncidentResolveSerializer(serializers.Serializer):
    note = serializers.CharField(
        trim_whitespace=False,
        help_text=f"required: how it was resolved; at most {NOTE_MAX} characters",
    )


class ThresholdsSerializer(serializers.Serializer):
    stuck_after_seconds = serializers.IntegerField(allow_null=True)
    max_attempts = serializers.IntegerField(allow_null=True)
    in_doubt_after_seconds = serializers.IntegerField(allow_null=True)
    step_thresholds = serializers.DictField(
        child=serializers.IntegerField(), help_text="step name -> seconds"
    )


class EffectiveThresholdsSerializer(ThresholdsSerializer):
    stuck_after_seconds = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    in_doubt_after_seconds = serializers.IntegerField()


class StepDurationSerializer(serializers.Serializer):
    step = serializers.CharField()
    count = serializers.IntegerField(help_text="finished forward attempts in the learning window")
    failures = serializers.IntegerField()
    p50_ms = serializers.FloatField(allow_null=True)
    p95_ms = serializers.FloatField(allow_null=True)
    p99_ms = serializers.FloatField(allow_null=True)
    slow_after_seconds = serializers.FloatField(
        allow_null=True, help_text="when a running attempt counts as stuck; null: no bound"
    )
    # DRF moves declared fields off the class: this does not hide Field.source.
    source = serializers.ChoiceField(  # type: ignore[assignment]
        choices=["configured", "learned"],
        allow_null=True,
        help_text="configured: the type's step threshold; learned: a multiple of the p99",
    )


class SagaTypeSerializer(serializers.Serializer):
    name = serializers.CharField()
    thresholds = ThresholdsSerializer(help_text="the type's own settings; null: the default")
    effective = EffectiveThresholdsSerializer(help_text="what the detector applies")
    steps = StepDurationSerializer(many=True)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField(allow_null=True)
    updated_by = serializers.CharField(allow_blank=True)


class SagaTypeUpdateSerializer(serializers.Serializer):
    """The PATCH body (for the schema; tracking.policy.saga_type_update checks the values)."""

    stuck_after_seconds = serializers.IntegerField(
        required=False, allow_null=True, help_text="null: use the default"
    )
    max_attempts = serializers.IntegerField(
        required=False, allow_null=True, help_text="null: use the default"
    )
    in_doubt_after_seconds = serializers.IntegerField(
        required=False, allow_null=True, help_text="null: use the default"
    )
    step_thresholds = serializers.DictField(
        child=serializers.IntegerField(allow_null=True),
        required=False,
        allow_null=True,
        help_text="replaces the whole map: step name -> seconds (null drops a step)",
    )
