"""Shapes of the API: read-only outputs, and the bodies of the incident, saga-type, start and
operator-action writes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.urls import reverse
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from orchestrator.models import Circuit
from sagaadmin.problems import PROBLEM_CONTENT_TYPE
from tracking.incidents import NOTE_MAX
from tracking.models import AuditEntry, Incident, OperatorAction, Saga, Step, TelemetryEvent
from tracking.protocol import redacted
from tracking.selectors import EventRow


class KnownFieldsOnly(serializers.Serializer):  # type: ignore[type-arg]
    """A request body whose every key must be a field: a misspelt key (``"filter"`` for
    ``"filters"``, ``"stpe"`` for ``"step"``) is refused by name instead of silently
    falling back to a default that may act on more than was meant."""

    def validate(self, attrs: Any) -> Any:
        if isinstance(self.initial_data, dict):
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                why = "not a field of this request; its fields: " + ", ".join(self.fields)
                raise serializers.ValidationError({name: [why] for name in unknown})
        return super().validate(attrs)


class StrictCharField(serializers.CharField):
    """A CharField that takes text only: DRF's turns a number (``"reason": 123``) into
    "123"; an API that names the field it refuses says so instead."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


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


def problem_responses(*statuses: int) -> dict[Any, Any]:
    """``extend_schema(responses=...)`` entries: these statuses answer problem+json."""
    return {(status, PROBLEM_CONTENT_TYPE): ProblemSerializer for status in statuses}


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
    note = StrictCharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        help_text=f"optional, at most {NOTE_MAX} characters",
    )


class IncidentResolveSerializer(serializers.Serializer):
    note = StrictCharField(
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


# -- the orchestrator ------------------------------------------------------------------


class RetryPolicySerializer(serializers.Serializer):
    max_attempts = serializers.IntegerField()
    backoff_base = serializers.FloatField(help_text="seconds before the 2nd attempt")
    backoff_max = serializers.FloatField(help_text="seconds: the longest delay")
    jitter = serializers.FloatField(help_text="delays are scaled by a factor in [1 - jitter, 1]")


class StepDefinitionSerializer(serializers.Serializer):
    name = serializers.CharField()
    kind = serializers.ChoiceField(choices=["local", "remote", "tcc"])
    service = serializers.CharField(allow_blank=True, help_text='remote: who runs it; else ""')
    command = serializers.CharField(allow_blank=True, help_text='remote: the action; else ""')
    undo_command = serializers.SerializerMethodField(help_text="remote: the compensation's action")
    retry = RetryPolicySerializer()
    compensation_retry = RetryPolicySerializer(source="undo_retry")
    timeout = serializers.FloatField(help_text="seconds an attempt may take")
    has_compensation = serializers.BooleanField()
    has_confirm = serializers.SerializerMethodField(help_text="tcc: a confirm action commits")

    def get_undo_command(self, step: Any) -> str:
        return str(step.undo_action) if step.kind == "remote" else ""

    def get_has_confirm(self, step: Any) -> bool:
        return step.confirm is not None


class SagaDefinitionSerializer(serializers.Serializer):
    name = serializers.CharField()
    service = serializers.CharField(help_text="the service its telemetry is reported as")
    steps = StepDefinitionSerializer(many=True)


class StepRunStateSerializer(serializers.Serializer):
    name = serializers.CharField()
    position = serializers.IntegerField()
    kind = serializers.CharField()
    service = serializers.CharField(allow_blank=True)
    command = serializers.CharField(allow_blank=True)
    status = serializers.CharField()
    attempt = serializers.IntegerField()
    compensation_attempt = serializers.IntegerField()
    epoch = serializers.IntegerField()
    tx_state = serializers.CharField(
        allow_blank=True, help_text='tcc: "", "prepared", "committed" or "rolled_back"'
    )
    command_id = serializers.CharField(allow_blank=True, help_text="remote: the command now out")
    deadline = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    ended_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.JSONField(allow_null=True)


class RunStateSerializer(serializers.Serializer):
    saga_id = serializers.CharField()
    saga_type = serializers.CharField()
    status = serializers.CharField()
    paused = serializers.BooleanField()
    waiting = serializers.CharField(allow_blank=True, help_text="why it is not advancing now")
    epoch = serializers.IntegerField(help_text="grows with every operator retry")
    version = serializers.IntegerField(help_text="grows with every transition")
    next_run_at = serializers.DateTimeField(
        allow_null=True, help_text="when a worker advances it; null: waits for a reply or person"
    )
    lease_owner = serializers.CharField(allow_blank=True, help_text="the worker holding it")
    lease_until = serializers.DateTimeField(allow_null=True)
    last_error = serializers.JSONField(allow_null=True)
    # DRF moves declared fields off the class: this does not hide Serializer.data.
    data = serializers.JSONField(  # type: ignore[assignment]
        help_text="the start's data (redacted like payloads)"
    )
    results = serializers.JSONField(help_text="step name -> the action's result (redacted)")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    ended_at = serializers.DateTimeField(allow_null=True)
    steps = StepRunStateSerializer(many=True)
    saga_url = serializers.SerializerMethodField()

    @extend_schema_field(OpenApiTypes.URI)
    def get_saga_url(self, state: Any) -> str:
        """The saga's telemetry in the read API (absolute when the serializer has the request)."""
        path = reverse("api-saga-detail", kwargs={"saga_id": state.saga_id})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class SagaStartSerializer(serializers.Serializer):
    saga_type = StrictCharField(help_text="a defined saga type")
    saga_id = StrictCharField(trim_whitespace=False, help_text="1 to 200 characters")
    data = serializers.JSONField(  # type: ignore[assignment]
        required=False, allow_null=True, help_text="a JSON object: the saga's input"
    )


class CircuitSerializer(serializers.ModelSerializer):
    state = serializers.ChoiceField(choices=["closed", "open", "half_open"])

    class Meta:
        model = Circuit
        fields = ["service", "state", "failures", "opened_at", "retry_at"]
        read_only_fields = fields


# -- operator actions and the audit log ------------------------------------------------


class ActionRequestSerializer(KnownFieldsOnly):
    """The body of ``POST /api/v1/sagas/{saga_id}/actions/{action}`` (tracking/actions.py
    checks the values and names the field it refuses)."""

    reason = StrictCharField(
        trim_whitespace=False,
        allow_blank=True,
        help_text="required: why (written to the audit log); at most 2000 characters",
    )
    expected_version = serializers.IntegerField(
        min_value=0,
        max_value=2**63 - 1,
        help_text="the saga's `version` you decided on; 409 with `current_version` when it moved",
    )
    step = StrictCharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        help_text="retry_step, skip_step, rerun: the step (default: the failed or current one)",
    )
    data = serializers.JSONField(  # type: ignore[assignment]
        required=False,
        allow_null=True,
        help_text="rerun only: the saga's new data, a JSON object (admins)",
    )
    request_id = StrictCharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        help_text="1 to 100 characters of yours: sent again, the first answer comes back "
        "and nothing is dispatched twice",
    )

    def validate_data(self, value: Any) -> Any:
        if value is not None and not isinstance(value, dict):
            raise serializers.ValidationError("a JSON object")
        if value is not None and self.context.get("action") != "rerun":
            raise serializers.ValidationError("only rerun takes data")
        return value


class ActionAnswerSerializer(serializers.Serializer):
    action = serializers.CharField()
    saga_id = serializers.CharField()
    status = serializers.ChoiceField(
        choices=["done", "dispatched", "awaiting_approval"],
        help_text="done: the orchestrator carried it out; dispatched: a command is on its way "
        "to the owning service; awaiting_approval: a second operator must approve it (the "
        "two-person rule). Follow it at /api/v1/actions/{id}",
    )
    command_id = serializers.CharField(
        allow_blank=True, help_text='dispatched: the command; else ""'
    )
    orchestrated = serializers.BooleanField()
    version = serializers.IntegerField(help_text="the saga's version after the action")
    id = serializers.IntegerField(help_text="the action's id: GET /api/v1/actions/{id}")
    resubmitted = serializers.BooleanField(
        required=False, help_text="present (true) when this answers a repeated request_id"
    )


class AvailabilitySerializer(serializers.Serializer):
    name = serializers.CharField()
    # DRF moves declared fields off the class: this does not hide Field.label.
    label = serializers.CharField()  # type: ignore[assignment]
    allowed = serializers.BooleanField(help_text="may you run it on this saga now?")
    reason = serializers.CharField(allow_blank=True, help_text='why not; "" when allowed')
    needs_step = serializers.BooleanField()
    step = serializers.CharField(allow_blank=True, help_text="the step it would act on")


class OperatorActionSerializer(serializers.ModelSerializer):
    # DRF moves declared fields off the class: this does not hide Serializer.data.
    data = serializers.SerializerMethodField(  # type: ignore[assignment]
        help_text="rerun: the edited data (redacted)"
    )

    class Meta:
        model = OperatorAction
        fields = [
            "id",
            "request_id",
            "action",
            "saga_id",
            "step",
            "actor",
            "reason",
            "data",
            "status",
            "orchestrated",
            "command_id",
            "service",
            "created_at",
            "dispatched_at",
            "acknowledged_at",
            "finished_at",
            "deadline",
            "error",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.JSONField(allow_null=True))
    def get_data(self, record: OperatorAction) -> Any:
        return redacted(record.data)


class SagaActionsSerializer(serializers.Serializer):
    saga_id = serializers.CharField()
    version = serializers.IntegerField(help_text="send it as expected_version")
    available = AvailabilitySerializer(many=True, help_text="every action, for you, now")
    history = OperatorActionSerializer(many=True, help_text="past actions, newest first")


class AuditEntrySerializer(serializers.ModelSerializer):
    operator_action_id = serializers.IntegerField(
        allow_null=True, help_text="the operator action: GET /api/v1/actions/{id}"
    )

    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "at",
            "actor",
            "role",
            "action",
            "saga_id",
            "step",
            "reason",
            "outcome",
            "detail",
            "state_before",
            "state_after",
            "operator_action_id",
        ]
        read_only_fields = fields
