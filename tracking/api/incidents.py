"""The incidents and saga-types API (README "Incidents and saga types").

Incidents: list and show them; operators and admins acknowledge and resolve
them through tracking/incidents.py, which locks, writes and publishes the
``sagaadmin.incident.*`` message. Saga types: every type's own thresholds,
the effective ones and the learned step durations; admins change the
thresholds through :func:`tracking.policy.saga_type_update`.

The services decide what is allowed and name the offending field; the views
only translate: ``IncidentRefused`` -> its status, ``InvalidThreshold`` and
``InvalidFilter`` -> 400, ``DoesNotExist`` -> 404, all problem+json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaadmin.problems import problem_response
from tracking.api.auth import CanAct, CanEditThresholdsOrReadOnly, IsPerson
from tracking.api.serializers import (
    IncidentAcknowledgeSerializer,
    IncidentResolveSerializer,
    IncidentSerializer,
    SagaTypeSerializer,
    SagaTypeUpdateSerializer,
    problem_responses,
)
from tracking.incidents import IncidentRefused, incident_acknowledge, incident_resolve
from tracking.models import Incident, IncidentKind, SagaType
from tracking.policy import InvalidThreshold, Policy, policy_load, saga_type_update
from tracking.selectors import INCIDENT_STATES, InvalidFilter, incident_list


def _username(request: Request) -> str:
    return str(request.user.get_username())


def _refused(exc: IncidentRefused) -> HttpResponse:
    """The service's refusal as problem+json with the field named (409: resolved already)."""
    if exc.status == 400:
        raise ValidationError({exc.field: [exc.message]})
    slug = "conflict" if exc.status == 409 else "refused"
    return problem_response(
        exc.status,
        slug,
        exc.message[:1].upper() + exc.message[1:] + ".",
        errors=[{"field": exc.field, "message": exc.message}],
    )


# -- incidents -----------------------------------------------------------------------

_INCIDENT_PARAMS = [
    OpenApiParameter(
        "state",
        str,
        enum=list(INCIDENT_STATES),
        description="unresolved (default: open or acknowledged), open, acknowledged, "
        "resolved or all",
    ),
    OpenApiParameter("kind", str, enum=list(IncidentKind.values)),
    OpenApiParameter("saga_type", str, description="exact saga type"),
    OpenApiParameter("saga_id", str, description="exact saga id"),
    OpenApiParameter("cursor", str, description="next_cursor of the previous page"),
    OpenApiParameter("limit", int, description="1 to 200, default 50"),
]


def _incident_get(incident_id: int) -> Incident:
    incident = Incident.objects.select_related("saga").filter(pk=incident_id).first()
    if incident is None:
        raise NotFound(f"No incident with id {incident_id}.")
    return incident


def _incident_body(request: Request, incident: Incident) -> dict[str, Any]:
    return dict(IncidentSerializer(incident, context={"request": request}).data)


class IncidentListView(APIView):
    @extend_schema(
        operation_id="incidents_list",
        summary="Incidents, newest first, one keyset page",
        parameters=_INCIDENT_PARAMS,
        responses={
            200: inline_serializer(
                "IncidentPage",
                {
                    "results": IncidentSerializer(many=True),
                    "next_cursor": serializers.CharField(allow_null=True),
                },
            ),
            **problem_responses(400),
        },
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        try:
            limit = int(params.get("limit", "50"))
        except ValueError:
            raise ValidationError({"limit": ["must be a whole number"]}) from None
        try:
            page = incident_list(
                state=params.get("state") or "unresolved",
                kind=params.get("kind", ""),
                saga_type=params.get("saga_type", ""),
                saga_id=params.get("saga_id", ""),
                cursor=params.get("cursor") or None,
                limit=limit,
            )
        except InvalidFilter as exc:
            raise ValidationError({exc.field: [exc.message]}) from exc
        results = IncidentSerializer(page.incidents, many=True, context={"request": request})
        return Response({"results": results.data, "next_cursor": page.next_cursor})


class IncidentDetailView(APIView):
    @extend_schema(
        operation_id="incidents_retrieve",
        summary="One incident",
        responses={200: IncidentSerializer, **problem_responses(404)},
    )
    def get(self, request: Request, incident_id: int) -> Response:
        return Response(_incident_body(request, _incident_get(incident_id)))


class IncidentAcknowledgeView(APIView):
    permission_classes = [IsPerson, CanAct]

    @extend_schema(
        operation_id="incidents_acknowledge",
        summary="Acknowledge an incident (operators and admins)",
        description="Idempotent while acknowledged; 409 once resolved.",
        request=IncidentAcknowledgeSerializer,
        responses={200: IncidentSerializer, **problem_responses(400, 403, 404, 409)},
    )
    def post(self, request: Request, incident_id: int) -> Response | HttpResponse:
        body = IncidentAcknowledgeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            incident = incident_acknowledge(
                incident_id=incident_id,
                user=_username(request),
                note=body.validated_data.get("note", ""),
            )
        except Incident.DoesNotExist:
            raise NotFound(f"No incident with id {incident_id}.") from None
        except IncidentRefused as exc:
            return _refused(exc)
        return Response(_incident_body(request, incident))


class IncidentResolveView(APIView):
    permission_classes = [IsPerson, CanAct]

    @extend_schema(
        operation_id="incidents_resolve",
        summary="Resolve an incident with a note (operators and admins)",
        description="409 when it is resolved already. The detector does not reopen it "
        "on the same evidence.",
        request=IncidentResolveSerializer,
        responses={200: IncidentSerializer, **problem_responses(400, 403, 404, 409)},
    )
    def post(self, request: Request, incident_id: int) -> Response | HttpResponse:
        body = IncidentResolveSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            incident = incident_resolve(
                incident_id=incident_id,
                user=_username(request),
                note=body.validated_data["note"],
            )
        except Incident.DoesNotExist:
            raise NotFound(f"No incident with id {incident_id}.") from None
        except IncidentRefused as exc:
            return _refused(exc)
        return Response(_incident_body(request, incident))


# -- saga types ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepDuration:
    step: str
    count: int
    failures: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    slow_after_seconds: float | None
    source: str | None


@dataclass(frozen=True, slots=True)
class SagaTypeReport:
    """A saga type as the API shows it: its own settings next to what applies."""

    name: str
    thresholds: dict[str, Any]
    effective: dict[str, Any]
    steps: list[StepDuration]
    created_at: Any
    updated_at: Any
    updated_by: str


def saga_type_report(row: SagaType, policy: Policy) -> SagaTypeReport:
    """``row``'s thresholds (None: the default), the effective ones, and per step (learned or
    configured) its durations and the bound past which it counts as stuck."""
    applied = policy.for_type(row.name)
    steps = sorted(
        {step for (saga_type, step) in policy.learned if saga_type == row.name}
        | set(applied.step_thresholds)
    )
    durations = []
    for step in steps:
        learned = policy.learned.get((row.name, step))
        bound = policy.step_bound(row.name, step)
        durations.append(
            StepDuration(
                step=step,
                count=learned.count if learned else 0,
                failures=learned.failures if learned else 0,
                p50_ms=learned.p50_ms if learned else None,
                p95_ms=learned.p95_ms if learned else None,
                p99_ms=learned.p99_ms if learned else None,
                slow_after_seconds=round(bound.limit.total_seconds(), 3) if bound else None,
                source=bound.source if bound else None,
            )
        )
    return SagaTypeReport(
        name=row.name,
        thresholds={
            "stuck_after_seconds": row.stuck_after_seconds,
            "max_attempts": row.max_attempts,
            "in_doubt_after_seconds": row.in_doubt_after_seconds,
            "step_thresholds": dict(row.step_thresholds or {}),
        },
        effective={
            "stuck_after_seconds": int(applied.stuck_after.total_seconds()),
            "max_attempts": applied.max_attempts,
            "in_doubt_after_seconds": int(applied.in_doubt_after.total_seconds()),
            "step_thresholds": {
                step: int(limit.total_seconds()) for step, limit in applied.step_thresholds.items()
            },
        },
        steps=durations,
        created_at=row.created_at,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


def _saga_type_get(name: str) -> SagaType:
    row = SagaType.objects.filter(name=name).first()
    if row is None:
        raise NotFound(f"No saga type '{name}'.")
    return row


class SagaTypeListView(APIView):
    @extend_schema(
        operation_id="saga_types_list",
        summary="Every saga type with its thresholds and learned step durations",
        responses=inline_serializer("SagaTypeList", {"results": SagaTypeSerializer(many=True)}),
    )
    def get(self, request: Request) -> Response:
        policy = policy_load()
        reports = [saga_type_report(row, policy) for row in SagaType.objects.order_by("name")]
        return Response({"results": SagaTypeSerializer(reports, many=True).data})


class SagaTypeDetailView(APIView):
    permission_classes = [IsPerson, CanEditThresholdsOrReadOnly]
    parser_classes = [JSONParser]

    @extend_schema(
        operation_id="saga_types_retrieve",
        summary="One saga type with its thresholds and learned step durations",
        responses={200: SagaTypeSerializer, **problem_responses(404)},
    )
    def get(self, request: Request, name: str) -> Response:
        row = _saga_type_get(name)
        return Response(SagaTypeSerializer(saga_type_report(row, policy_load())).data)

    @extend_schema(
        operation_id="saga_types_partial_update",
        summary="Change a saga type's thresholds (admins)",
        description="Only the fields given change; null means the default. "
        "`step_thresholds` replaces the whole map. The type's unfinished sagas are "
        "checked again on the detector's next pass.",
        request=SagaTypeUpdateSerializer,
        responses={200: SagaTypeSerializer, **problem_responses(400, 403, 404)},
    )
    def patch(self, request: Request, name: str) -> Response:
        if not isinstance(request.data, dict):
            raise ValidationError({"request": ["a JSON object of the fields to change"]})
        try:
            row = saga_type_update(name=name, changes=request.data, user=_username(request))
        except SagaType.DoesNotExist:
            raise NotFound(f"No saga type '{name}'.") from None
        except InvalidThreshold as exc:
            raise ValidationError({exc.field: [exc.message]}) from exc
        return Response(SagaTypeSerializer(saga_type_report(row, policy_load())).data)
