"""The orchestrator's API (README "API overview"), and the reads and the start it shares with
the dashboard's Orchestrator page (tracking/views.py).

* ``GET  /api/v1/orchestrator/definitions``: the saga types defined in this process;
* ``POST /api/v1/orchestrator/sagas``: start one (admins), idempotent on ``saga_id``;
* ``GET  /api/v1/orchestrator/sagas/{saga_id}``: a run's state and its steps';
* ``GET  /api/v1/orchestrator/circuits``: every circuit breaker.

Operator actions on runs (the hooks of orchestrator/hooks.py) come with a later issue.

The run state crosses to the API and the templates as frozen dataclasses
(:class:`RunState`, :class:`StepRunState`, :class:`RunSummary`): the data, the
results and the errors in them are redacted like reported payloads
(``SAGAADMIN_PAYLOAD_REDACT_KEYS``). The orchestrator decides what may start
and names the offending field; the views only translate ``StartRefused`` and
``UnknownSagaType`` to 400 problem+json.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.http import HttpResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import permissions
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestrator.circuit import circuits_list
from orchestrator.definitions import UnknownSagaType, definition_get, definitions_list
from orchestrator.engine import StartRefused, saga_start
from orchestrator.models import RunStatus, SagaRun, StepRun
from tracking.api.auth import IsPerson
from tracking.api.serializers import (
    CircuitSerializer,
    RunStateSerializer,
    SagaDefinitionSerializer,
    SagaStartSerializer,
    problem_responses,
)
from tracking.models import Saga
from tracking.protocol import redacted
from tracking.roles import can_start_sagas

# -- the run state, as the API and the dashboard show it -------------------------------


@dataclass(frozen=True, slots=True)
class StepRunState:
    name: str
    position: int
    kind: str
    service: str  # remote steps: who runs it; "" when the type is not defined here
    command: str
    status: str
    attempt: int
    compensation_attempt: int
    epoch: int
    tx_state: str
    command_id: str
    deadline: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    last_error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RunState:
    saga_id: str
    saga_type: str
    status: str
    is_terminal: bool
    paused: bool
    waiting: str
    epoch: int
    version: int
    next_run_at: datetime | None
    lease_owner: str
    lease_until: datetime | None
    last_error: dict[str, Any] | None
    data: dict[str, Any]
    results: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    defined: bool  # is its saga type defined in this process (ORCHESTRATOR_SAGAS)?
    steps: tuple[StepRunState, ...]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run on the dashboard's list of runs that are not finished."""

    saga_id: str
    saga_type: str
    status: str
    paused: bool
    waiting: str
    next_run_at: datetime | None
    lease_owner: str
    lease_until: datetime | None
    version: int
    created_at: datetime


def _run_state(run: SagaRun, steps: list[StepRun]) -> RunState:
    try:
        definition = definition_get(run.saga_type)
    except UnknownSagaType:
        specs = {}
    else:
        specs = {s.name: s for s in definition.steps}
    return RunState(
        saga_id=run.saga_id,
        saga_type=run.saga_type,
        status=run.status,
        is_terminal=run.is_terminal,
        paused=run.paused,
        waiting=run.waiting,
        epoch=run.epoch,
        version=run.version,
        next_run_at=run.next_run_at,
        lease_owner=run.lease_owner,
        lease_until=run.lease_until,
        last_error=redacted(run.last_error),
        data=redacted(run.data),
        results=redacted(run.results),
        created_at=run.created_at,
        updated_at=run.updated_at,
        ended_at=run.ended_at,
        defined=bool(specs),
        steps=tuple(
            StepRunState(
                name=s.name,
                position=s.position,
                kind=s.kind,
                service=specs[s.name].service if s.name in specs else "",
                command=specs[s.name].command if s.name in specs else "",
                status=s.status,
                attempt=s.attempt,
                compensation_attempt=s.compensation_attempt,
                epoch=s.epoch,
                tx_state=s.tx_state,
                command_id=s.command_id,
                deadline=s.deadline,
                started_at=s.started_at,
                ended_at=s.ended_at,
                last_error=redacted(s.last_error),
            )
            for s in steps
        ),
    )


def run_state_get(*, saga_id: str) -> RunState | None:
    """The orchestrator's run of ``saga_id`` with its steps, or None: not orchestrated."""
    run = SagaRun.objects.filter(saga_id=saga_id).first()
    if run is None:
        return None
    return _run_state(run, list(StepRun.objects.filter(run=run).order_by("position")))


def runs_unfinished_list(*, limit: int = 100) -> tuple[list[RunSummary], int]:
    """Up to ``limit`` runs that are not finished, newest first, and how many there are."""
    unfinished = SagaRun.objects.filter(status__in=[RunStatus.RUNNING, RunStatus.COMPENSATING])
    rows = unfinished.order_by("-created_at", "-pk").values_list(
        "saga_id",
        "saga_type",
        "status",
        "paused",
        "waiting",
        "next_run_at",
        "lease_owner",
        "lease_until",
        "version",
        "created_at",
    )[:limit]
    summaries = [RunSummary(*row) for row in rows]
    total = len(summaries) if len(summaries) < limit else unfinished.count()
    return summaries, total


# -- starting a saga -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartResult:
    run: RunState
    created: bool  # False: a run with this saga id existed already (start is idempotent)


def orchestrated_saga_start(*, saga_type: str, saga_id: str, data: Any) -> StartResult:
    """Start a saga of a registered type in its own transaction (admins; the caller checks).

    Idempotent on ``saga_id``: an existing run of the same type is returned with
    ``created=False``. Raises ``StartRefused`` naming the field (also for a saga id
    that services report on and the orchestrator does not run: their events and
    the orchestrator's would mix in one timeline) or ``UnknownSagaType``.

    Two first starts of one saga id at the same moment create one run, and may
    both answer ``created=True``.
    """
    with transaction.atomic(durable=True):
        existed = SagaRun.objects.filter(saga_id=saga_id).exists()
        if not existed and Saga.objects.filter(saga_id=saga_id).exists():
            definition_get(saga_type)  # an unknown type is the first thing to say
            raise StartRefused(
                "saga_id", "already used by a saga that services report (not orchestrated)"
            )
        run = saga_start(saga_type=saga_type, saga_id=saga_id, data=data)
        steps = list(StepRun.objects.filter(run=run).order_by("position"))
        return StartResult(run=_run_state(run, steps), created=not existed)


# -- the API ---------------------------------------------------------------------------


class CanStartSagasOrReadOnly(permissions.BasePermission):
    """Anyone allowed in may read; only admins start sagas."""

    message = "Only admins can start sagas."

    def has_permission(self, request: Any, view: Any) -> bool:
        return request.method in permissions.SAFE_METHODS or can_start_sagas(request.user)


class DefinitionListView(APIView):
    @extend_schema(
        operation_id="orchestrator_definitions_list",
        summary="The saga types defined in this process, with their steps",
        responses=inline_serializer(
            "SagaDefinitionList", {"results": SagaDefinitionSerializer(many=True)}
        ),
    )
    def get(self, request: Request) -> Response:
        return Response({"results": SagaDefinitionSerializer(definitions_list(), many=True).data})


class SagaStartView(APIView):
    permission_classes = [IsPerson, CanStartSagasOrReadOnly]
    parser_classes = [JSONParser]

    @extend_schema(
        operation_id="orchestrator_sagas_start",
        summary="Start an orchestrated saga of a defined type (admins)",
        description="Idempotent on `saga_id`: 201 with the new run, 200 with the run that "
        "existed already (of the same type; another type is a 400 naming `saga_id`). "
        "A worker takes it up at once.",
        request=SagaStartSerializer,
        responses={201: RunStateSerializer, 200: RunStateSerializer, **problem_responses(400, 403)},
    )
    def post(self, request: Request) -> Response | HttpResponse:
        given = SagaStartSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        fields = given.validated_data
        try:
            result = orchestrated_saga_start(
                saga_type=fields["saga_type"], saga_id=fields["saga_id"], data=fields.get("data")
            )
        except UnknownSagaType as exc:
            raise ValidationError(
                {"saga_type": [f"no saga type {exc.name!r} is defined"]}
            ) from None
        except StartRefused as exc:
            raise ValidationError({exc.field: [exc.message]}) from None
        run = RunStateSerializer(result.run, context={"request": request}).data
        return Response(run, status=201 if result.created else 200)


class RunDetailView(APIView):
    @extend_schema(
        operation_id="orchestrator_sagas_retrieve",
        summary="An orchestrated saga's run state and its steps'",
        responses={200: RunStateSerializer, **problem_responses(404)},
    )
    def get(self, request: Request, saga_id: str) -> Response:
        state = run_state_get(saga_id=saga_id)
        if state is None:
            raise NotFound(f"No orchestrated saga with id '{saga_id}'.")
        return Response(RunStateSerializer(state, context={"request": request}).data)


class CircuitListView(APIView):
    @extend_schema(
        operation_id="orchestrator_circuits_list",
        summary="Every circuit breaker (one per service of remote steps that failed once)",
        responses=inline_serializer("CircuitList", {"results": CircuitSerializer(many=True)}),
    )
    def get(self, request: Request) -> Response:
        return Response({"results": CircuitSerializer(circuits_list(), many=True).data})
