"""The read API: sagas, one saga with its steps, a saga's events."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tracking.api.serializers import (
    EventSerializer,
    SagaDetailSerializer,
    SagaSerializer,
    problem_responses,
)
from tracking.selectors import (
    SORTS,
    InvalidFilter,
    SagaFilter,
    saga_events_list,
    saga_get,
    saga_list,
)

_LIST_PARAMS = [
    OpenApiParameter("type", str, description="saga type"),
    OpenApiParameter("status", str, description="comma-separated statuses"),
    OpenApiParameter("service", str, description="a service that reported on the saga"),
    OpenApiParameter("step", str, description="sagas that have a step of this name"),
    OpenApiParameter("flag", str, description="e.g. anomaly, clock_skew"),
    OpenApiParameter("saga_id", str, description="saga id prefix"),
    OpenApiParameter("started_after", OpenApiTypes.DATETIME),
    OpenApiParameter("started_before", OpenApiTypes.DATETIME),
    OpenApiParameter("attr.<key>", str, description="business attribute, e.g. attr.order_id=42"),
    OpenApiParameter("sort", str, enum=list(SORTS)),
    OpenApiParameter("cursor", str, description="next_cursor of the previous page"),
    OpenApiParameter("limit", int, description="1 to 200, default 50"),
]


def _invalid(exc: InvalidFilter) -> ValidationError:
    return ValidationError({exc.field: [exc.message]})


class SagaListView(APIView):
    @extend_schema(
        operation_id="sagas_list",
        parameters=_LIST_PARAMS,
        responses={
            200: inline_serializer(
                "SagaPage",
                {
                    "results": SagaSerializer(many=True),
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
            page = saga_list(
                filters=SagaFilter.from_params(params),
                sort=params.get("sort", "-started_at"),
                cursor=params.get("cursor"),
                limit=limit,
            )
        except InvalidFilter as exc:
            raise _invalid(exc) from exc
        return Response(
            {"results": SagaSerializer(page.sagas, many=True).data, "next_cursor": page.next_cursor}
        )


class SagaDetailView(APIView):
    @extend_schema(responses={200: SagaDetailSerializer, **problem_responses(404)})
    def get(self, request: Request, saga_id: str) -> Response:
        saga = saga_get(saga_id=saga_id)
        if saga is None:
            raise Http404(f"No saga with id '{saga_id}'.")
        return Response(SagaDetailSerializer(saga).data)


class SagaEventsView(APIView):
    @extend_schema(
        responses={
            200: inline_serializer("SagaEvents", {"results": EventSerializer(many=True)}),
            **problem_responses(404),
        }
    )
    def get(self, request: Request, saga_id: str) -> Response:
        events = saga_events_list(saga_id=saga_id)
        if not events:
            raise Http404(f"No saga with id '{saga_id}'.")
        return Response({"results": EventSerializer(events, many=True).data})
