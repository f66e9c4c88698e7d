"""Bulk actions and two-person approvals over the API (docs/operations.md).

* ``POST /api/v1/bulk-actions/preview`` ``{filters}``: how many sagas the
  filter (the saga list's parameters) matches now, and a sample.
* ``POST /api/v1/bulk-actions`` ``{action, filters, reason, expected_count}``:
  fix the matching sagas and queue the job (202; the worker runs it).
* ``GET /api/v1/bulk-actions/{id}``: its progress and per-saga results.
* ``POST /api/v1/bulk-actions/{id}/cancel`` and ``/approve``.
* ``POST /api/v1/actions/{id}/approve`` and ``/reject`` ``{note}``: a single
  action waiting for a second operator.

Refusals are :class:`~tracking.actions.ActionError` as problem+json, like the
single actions (tracking/api/actions.py).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tracking.actions import ActionError, action_approve, action_reject
from tracking.api.actions import action_refused
from tracking.api.serializers import KnownFieldsOnly, StrictCharField, problem_responses
from tracking.bulk_actions import bulk_approve, bulk_cancel, bulk_preview, bulk_start
from tracking.models import BulkJob
from tracking.selectors import InvalidFilter

ITEMS_MAX = 1000  # per-saga results in one answer


class FilterValueField(serializers.CharField):
    """A filter's value: text, or a JSON number or boolean, taken as the list's query
    string writes it (``42``, ``true``), for any key: ``attr.<key>`` then matches the
    reported scalar either way (``selectors._scalar``); other keys check the text as
    usual (``{"status": true}`` is refused as an unknown status). Null, lists and
    objects are refused."""

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, bool):
            data = "true" if data else "false"
        return str(super().to_internal_value(data))


class FiltersField(serializers.DictField):
    child = FilterValueField(allow_blank=True, max_length=400)


class PreviewRequest(KnownFieldsOnly):
    filters = FiltersField(required=False, default=dict)


class StartRequest(PreviewRequest):
    action = StrictCharField(max_length=32)
    reason = StrictCharField(max_length=2000)
    expected_count = serializers.IntegerField(min_value=1)
    rate = serializers.FloatField(min_value=0, max_value=1000, required=False)


class NoteRequest(KnownFieldsOnly):
    note = StrictCharField(max_length=2000, required=False, allow_blank=True, default="")


class BulkJobSerializer(serializers.ModelSerializer[BulkJob]):
    processed = serializers.IntegerField(read_only=True)
    items = serializers.SerializerMethodField()

    class Meta:
        model = BulkJob
        fields = [
            "id",
            "action",
            "filters",
            "reason",
            "actor",
            "status",
            "approved_by",
            "rate",
            "total",
            "processed",
            "succeeded",
            "failed",
            "created_at",
            "finished_at",
            "items",
        ]

    def get_items(self, job: BulkJob) -> list[dict[str, Any]]:
        return [
            {"saga_id": saga_id, "status": status, "result": result}
            for saga_id, status, result in job.items.order_by("pk").values_list(
                "saga_id", "status", "result"
            )[:ITEMS_MAX]
        ]


def _refused(exc: ActionError | InvalidFilter) -> HttpResponse:
    if isinstance(exc, InvalidFilter):
        exc = ActionError(400, f"filters.{exc.field}", exc.message)
    return action_refused(exc)


class BulkPreviewView(APIView):
    parser_classes = [JSONParser]

    @extend_schema(
        operation_id="bulk_actions_preview",
        summary="How many sagas a list filter matches now, and a sample",
        request=PreviewRequest,
        responses={
            200: inline_serializer(
                "BulkPreview",
                {"count": serializers.IntegerField(), "sample": serializers.ListField()},
            ),
            **problem_responses(400),
        },
    )
    def post(self, request: Request) -> Response | HttpResponse:
        body = PreviewRequest(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            preview = bulk_preview(filters=body.validated_data["filters"])
        except InvalidFilter as exc:
            return _refused(exc)
        return Response({"count": preview.count, "sample": preview.sample})


class BulkJobListView(APIView):
    parser_classes = [JSONParser]

    @extend_schema(
        operation_id="bulk_actions_start",
        summary="Run an action over every saga a filter matches (the count you confirmed)",
        description="202 with the job; its progress at `Location`. 409 `expected_count` "
        "(with `current_count`) when the filter matches another number now.",
        request=StartRequest,
        responses={202: BulkJobSerializer, **problem_responses(400, 403, 404, 409)},
    )
    def post(self, request: Request) -> Response | HttpResponse:
        body = StartRequest(data=request.data)
        body.is_valid(raise_exception=True)
        fields = body.validated_data
        try:
            job = bulk_start(
                action=fields["action"],
                filters=fields["filters"],
                reason=fields["reason"],
                user=request.user,
                expected_count=fields["expected_count"],
                rate=fields.get("rate"),
            )
        except (ActionError, InvalidFilter) as exc:
            return _refused(exc)
        location = reverse("api-bulk-job", kwargs={"job_id": job.pk})
        return Response(BulkJobSerializer(job).data, status=202, headers={"Location": location})


class BulkJobView(APIView):
    @extend_schema(
        operation_id="bulk_actions_retrieve",
        summary="A bulk job's progress and per-saga results",
        responses={200: BulkJobSerializer, **problem_responses(404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = BulkJob.objects.filter(pk=job_id).first()
        if job is None:
            raise NotFound(f"No bulk job {job_id}.")
        return Response(BulkJobSerializer(job).data)


class BulkJobCancelView(APIView):
    @extend_schema(
        operation_id="bulk_actions_cancel",
        summary="Stop a bulk job: sagas not dispatched yet are left alone",
        request=None,
        responses={200: BulkJobSerializer, **problem_responses(403, 404, 409)},
    )
    def post(self, request: Request, job_id: int) -> Response | HttpResponse:
        try:
            job = bulk_cancel(job_id=job_id, user=request.user)
        except BulkJob.DoesNotExist:
            raise NotFound(f"No bulk job {job_id}.") from None
        except ActionError as exc:
            return _refused(exc)
        return Response(BulkJobSerializer(job).data)


class BulkJobApproveView(APIView):
    @extend_schema(
        operation_id="bulk_actions_approve",
        summary="The two-person rule: a second operator lets a big job run",
        request=None,
        responses={200: BulkJobSerializer, **problem_responses(403, 404, 409)},
    )
    def post(self, request: Request, job_id: int) -> Response | HttpResponse:
        try:
            job = bulk_approve(job_id=job_id, user=request.user)
        except BulkJob.DoesNotExist:
            raise NotFound(f"No bulk job {job_id}.") from None
        except ActionError as exc:
            return _refused(exc)
        return Response(BulkJobSerializer(job).data)


class ActionApproveView(APIView):
    @extend_schema(
        operation_id="actions_approve",
        summary="The two-person rule: approve an action waiting for a second operator",
        request=None,
        responses={200: inline_serializer("Approved", {}), **problem_responses(403, 404, 409)},
    )
    def post(self, request: Request, action_id: int) -> Response | HttpResponse:
        try:
            return Response(action_approve(action_id=action_id, user=request.user))
        except ActionError as exc:
            return _refused(exc)


class ActionRejectView(APIView):
    parser_classes = [JSONParser]

    @extend_schema(
        operation_id="actions_reject",
        summary="The two-person rule: turn down an action waiting for a second operator",
        request=NoteRequest,
        responses={200: inline_serializer("Rejected", {}), **problem_responses(400, 403, 404, 409)},
    )
    def post(self, request: Request, action_id: int) -> Response | HttpResponse:
        body = NoteRequest(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            return Response(
                action_reject(
                    action_id=action_id, user=request.user, note=body.validated_data["note"]
                )
            )
        except ActionError as exc:
            return _refused(exc)
