"""Operator actions and the audit log over the API (README "API overview").

* ``POST /api/v1/sagas/{saga_id}/actions/{action}``: run one action through
  :func:`tracking.actions.saga_action_run`, the same core the dashboard and
  ``manage.py saga_action`` use. **200** when it is done (an orchestrated saga:
  the orchestrator's hook ran in the request's transaction), **202** when it is
  dispatched (a command message to the owning service is in the outbox) or
  awaiting a second operator's approval (the two-person rule); its progress is
  at ``Location: /api/v1/actions/{id}``. A repeated ``request_id``
  answers the first answer again (``"resubmitted": true``) with the same code.
* ``GET /api/v1/sagas/{saga_id}/actions``: every action with its verdict for
  the caller, and the saga's past actions with their progress.
* ``GET /api/v1/actions/{id}``: one action's progress.
* ``GET /api/v1/audit``: the audit log, newest first, keyset pages; with
  ``?format=csv`` or ``?format=jsonl`` everything the filter matches, streamed.

Anyone with a role may call them; whether the caller may *run* an action is
the core's decision (the action's permission), so a viewer's attempt gets 403
and is audited like every refusal. People without a role and service keys are
turned away by :class:`~tracking.api.auth.IsPerson` first (not audited: they
learn nothing about the saga). The core names the offending field; the views
translate :class:`~tracking.actions.ActionError` to problem+json with its
status, the field in ``errors`` and ``current_version`` on a stale version.
"""

from __future__ import annotations

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaadmin.problems import problem_response
from tracking.actions import ACTIONS, ActionError, ActionInput, actions_available, saga_action_run
from tracking.api.serializers import (
    ActionAnswerSerializer,
    ActionRequestSerializer,
    AuditEntrySerializer,
    OperatorActionSerializer,
    SagaActionsSerializer,
    problem_responses,
)
from tracking.audit import AuditFilter, audit_export, audit_list
from tracking.models import ActionStatus, OperatorAction, Saga
from tracking.selectors import InvalidFilter

HISTORY_MAX = 100  # past actions shown with a saga's actions


_SLUGS = {400: "invalid-parameters", 403: "forbidden", 404: "not-found", 409: "conflict"}


def action_refused(exc: ActionError) -> HttpResponse:
    """The core's refusal as problem+json: its status, the field named, and its extras
    (``current_version`` on a stale version)."""
    return problem_response(
        exc.status,
        _SLUGS.get(exc.status, "refused"),
        exc.message[:1].upper() + exc.message[1:] + ".",
        errors=[{"field": exc.field, "message": exc.message}],
        **exc.extra,
    )


# -- running one ---------------------------------------------------------------------


@csrf_exempt  # it changes nothing
def saga_action_unknown_view(request: HttpRequest, saga_id: str, action: str) -> HttpResponse:
    """``sagas/<id>/actions/<name>`` where the name is no action's (not lowercase
    letters and _): a POST is refused naming ``action`` (not a 405 from the detail
    route), a GET reads the saga whose id is the whole path (ids may hold "/")."""
    if request.method in ("GET", "HEAD"):
        from tracking.api.views import SagaDetailView

        detail = SagaDetailView.as_view()
        return detail(request, saga_id=f"{saga_id}/actions/{action}")  # type: ignore[no-any-return]
    return action_refused(
        ActionError(404, "action", f"no action {action!r}; one of {', '.join(ACTIONS)}")
    )


class SagaActionView(APIView):
    parser_classes = [JSONParser]

    @extend_schema(
        operation_id="saga_actions_run",
        summary="Run an operator action on a saga (operators; terminate and editing data: admins)",
        description="`action` is one of "
        + ", ".join(f"`{name}`" for name in ACTIONS)
        + ". 200 when it is done (orchestrated sagas), 202 when a command was dispatched "
        "to the owning service or the action awaits a second operator's approval (its "
        "progress: the `Location` header, `/api/v1/actions/{id}`). Refusals are "
        "problem+json naming the field: 400 `reason`, `step`, `request_id`, "
        "`expected_version`, `data`; 403 `role`, `data` "
        "(audited); 404 `saga_id`, `action`; 409 `version` (with `current_version`), "
        "`status`, `step`, `service`, `action` (audited). A repeated `request_id` gets the "
        "first answer with `resubmitted: true` and dispatches nothing.",
        request=ActionRequestSerializer,
        responses={
            200: ActionAnswerSerializer,
            202: ActionAnswerSerializer,
            **problem_responses(400, 403, 404, 409),
        },
    )
    def post(self, request: Request, saga_id: str, action: str) -> Response | HttpResponse:
        if action not in ACTIONS:
            return action_refused(
                ActionError(404, "action", f"no action {action!r}; one of {', '.join(ACTIONS)}")
            )
        body = ActionRequestSerializer(data=request.data, context={"action": action})
        body.is_valid(raise_exception=True)
        fields = body.validated_data
        try:
            answer = saga_action_run(
                ActionInput(
                    action=action,
                    saga_id=saga_id,
                    actor=request.user,
                    reason=fields["reason"],
                    expected_version=fields["expected_version"],
                    step=fields.get("step", ""),
                    data=fields.get("data"),
                    request_id=fields.get("request_id"),
                )
            )
        except ActionError as exc:
            return action_refused(exc)
        if answer["status"] == ActionStatus.DONE:
            return Response(answer)
        # dispatched, or waiting for a second operator (the two-person rule): follow it there
        location = reverse("api-action-detail", kwargs={"action_id": answer["id"]})
        return Response(answer, status=202, headers={"Location": location})


# -- reading them --------------------------------------------------------------------


class SagaActionListView(APIView):
    @extend_schema(
        operation_id="saga_actions_list",
        summary="What you may do to a saga now, and what was done to it",
        description=f"`available`: every action with its verdict for you (why not, when "
        f"not). `history`: the saga's last {HISTORY_MAX} actions, refusals included, "
        "newest first, with their progress.",
        responses={200: SagaActionsSerializer, **problem_responses(404)},
    )
    def get(self, request: Request, saga_id: str) -> Response:
        saga = Saga.objects.filter(saga_id=saga_id, event_count__gt=0).first()
        if saga is None:
            raise NotFound(f"No saga with id '{saga_id}'.")
        history = OperatorAction.objects.filter(saga_id=saga_id).order_by("-created_at", "-pk")
        body = {
            "saga_id": saga.saga_id,
            "version": saga.version,
            "available": actions_available(saga_id=saga_id, user=request.user),
            "history": list(history[:HISTORY_MAX]),
        }
        return Response(SagaActionsSerializer(body).data)


class ActionDetailView(APIView):
    @extend_schema(
        operation_id="actions_retrieve",
        summary="One operator action and its progress",
        description="`status`: requested → dispatched → acknowledged → done or failed "
        "(or timed_out when the service did not answer in time); done at once for "
        "orchestrated sagas; refused with `error` naming why.",
        responses={200: OperatorActionSerializer, **problem_responses(404)},
    )
    def get(self, request: Request, action_id: int) -> Response:
        record = OperatorAction.objects.filter(pk=action_id).first()
        if record is None:
            raise NotFound(f"No action with id {action_id}.")
        return Response(OperatorActionSerializer(record).data)


# -- the audit log -------------------------------------------------------------------


_AUDIT_PARAMS = [
    OpenApiParameter("actor", str, description="exact username"),
    OpenApiParameter("action", str, description="exact action, e.g. retry_step"),
    OpenApiParameter("saga_id", str, description="exact saga id"),
    OpenApiParameter(
        "outcome",
        str,
        description="exact outcome: done, dispatched, forbidden, conflict, refused, ...",
    ),
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="at or after (RFC 3339)"),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="before (RFC 3339)"),
    OpenApiParameter("cursor", str, description="next_cursor of the previous page"),
    OpenApiParameter("limit", int, description="1 to 200, default 50"),
    OpenApiParameter(
        "format",
        str,
        enum=["json", "csv", "jsonl"],
        description="json (default): one page; csv or jsonl: every entry the filter "
        "matches, streamed as a download (cursor and limit ignored)",
    ),
]


class AuditListView(APIView):
    @extend_schema(
        operation_id="audit_list",
        summary="The audit log, newest first: one keyset page, or an export",
        parameters=_AUDIT_PARAMS,
        responses={
            (200, "application/json"): inline_serializer(
                "AuditPage",
                {
                    "results": AuditEntrySerializer(many=True),
                    "next_cursor": serializers.CharField(allow_null=True),
                },
            ),
            (200, "text/csv"): OpenApiResponse(
                OpenApiTypes.STR,
                description="format=csv: a header row, then one row per entry; the states "
                "as JSON; text starting with = + - @ gets a leading '",
            ),
            (200, "application/jsonl"): OpenApiResponse(
                OpenApiTypes.STR, description="format=jsonl: one entry (as in results) per line"
            ),
            **problem_responses(400),
        },
    )
    def get(self, request: Request) -> Response | StreamingHttpResponse:
        params = request.query_params
        fmt = params.get("format") or "json"
        if fmt not in ("json", "csv", "jsonl"):
            raise ValidationError({"format": ["one of json, csv, jsonl"]})
        try:
            filters = AuditFilter.from_params(params)
            if fmt != "json":
                return audit_export(
                    filters=filters, fmt=fmt, asgi=isinstance(request._request, ASGIRequest)
                )
            try:
                limit = int(params.get("limit", "50"))
            except ValueError:
                raise InvalidFilter("limit", "must be a whole number") from None
            page = audit_list(filters=filters, cursor=params.get("cursor") or None, limit=limit)
        except InvalidFilter as exc:
            raise ValidationError({exc.field: [exc.message]}) from exc
        results = AuditEntrySerializer(page.entries, many=True).data
        return Response({"results": results, "next_cursor": page.next_cursor})

    def perform_content_negotiation(
        self, request: Request, force: bool = False
    ) -> tuple[BaseRenderer, str]:
        """JSON for pages and errors: ``?format=`` selects an export here, not a renderer."""
        renderer = self.get_renderers()[0]
        return renderer, renderer.media_type
