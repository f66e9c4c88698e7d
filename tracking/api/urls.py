from django.urls import path, re_path

from tracking.api.actions import (
    ActionDetailView,
    AuditListView,
    SagaActionListView,
    SagaActionView,
    saga_action_unknown_view,
)
from tracking.api.bulk import (
    ActionApproveView,
    ActionRejectView,
    BulkJobApproveView,
    BulkJobCancelView,
    BulkJobListView,
    BulkJobView,
    BulkPreviewView,
)
from tracking.api.incidents import (
    IncidentAcknowledgeView,
    IncidentDetailView,
    IncidentListView,
    IncidentResolveView,
    SagaTypeDetailView,
    SagaTypeListView,
)
from tracking.api.ingest import events_view
from tracking.api.orchestrator import (
    CircuitListView,
    DefinitionListView,
    RunDetailView,
    SagaStartView,
)
from tracking.api.otlp import otlp_traces_view
from tracking.api.views import SagaDetailView, SagaEventsView, SagaListView

# Names start with "api-": the dashboard (tracking/urls.py) has its own "saga-list" and
# "saga-detail", and reverse() must find each one.
urlpatterns = [
    path("events", events_view, name="events"),
    path("otlp/v1/traces", otlp_traces_view, name="otlp-traces"),
    path("sagas", SagaListView.as_view(), name="api-saga-list"),
    re_path(r"^sagas/(?P<saga_id>.+)/events$", SagaEventsView.as_view(), name="api-saga-events"),
    re_path(
        r"^sagas/(?P<saga_id>.+)/actions/(?P<action>[a-z_]+)$",
        SagaActionView.as_view(),
        name="api-saga-action",
    ),
    re_path(  # any other name: POST is a 404 naming it, GET the saga of that whole id
        r"^sagas/(?P<saga_id>.+)/actions/(?P<action>[^/]*[^a-z_/][^/]*|)$",
        saga_action_unknown_view,
    ),
    re_path(
        r"^sagas/(?P<saga_id>.+)/actions$", SagaActionListView.as_view(), name="api-saga-actions"
    ),
    re_path(r"^sagas/(?P<saga_id>.+)$", SagaDetailView.as_view(), name="api-saga-detail"),
    path("actions/<int:action_id>", ActionDetailView.as_view(), name="api-action-detail"),
    path("actions/<int:action_id>/approve", ActionApproveView.as_view(), name="api-action-approve"),
    path("actions/<int:action_id>/reject", ActionRejectView.as_view(), name="api-action-reject"),
    path("bulk-actions", BulkJobListView.as_view(), name="api-bulk-jobs"),
    path("bulk-actions/preview", BulkPreviewView.as_view(), name="api-bulk-preview"),
    path("bulk-actions/<int:job_id>", BulkJobView.as_view(), name="api-bulk-job"),
    path("bulk-actions/<int:job_id>/cancel", BulkJobCancelView.as_view(), name="api-bulk-cancel"),
    path(
        "bulk-actions/<int:job_id>/approve",
        BulkJobApproveView.as_view(),
        name="api-bulk-approve",
    ),
    path("audit", AuditListView.as_view(), name="api-audit-list"),
    path("incidents", IncidentListView.as_view(), name="api-incident-list"),
    path("incidents/<int:incident_id>", IncidentDetailView.as_view(), name="api-incident-detail"),
    path(
        "incidents/<int:incident_id>/acknowledge",
        IncidentAcknowledgeView.as_view(),
        name="api-incident-acknowledge",
    ),
    path(
        "incidents/<int:incident_id>/resolve",
        IncidentResolveView.as_view(),
        name="api-incident-resolve",
    ),
    path("saga-types", SagaTypeListView.as_view(), name="api-saga-type-list"),
    re_path(
        r"^saga-types/(?P<name>.+)$", SagaTypeDetailView.as_view(), name="api-saga-type-detail"
    ),
    path(
        "orchestrator/definitions",
        DefinitionListView.as_view(),
        name="api-orchestrator-definitions",
    ),
    path("orchestrator/sagas", SagaStartView.as_view(), name="api-orchestrator-start"),
    re_path(
        r"^orchestrator/sagas/(?P<saga_id>.+)$",
        RunDetailView.as_view(),
        name="api-orchestrator-run",
    ),
    path("orchestrator/circuits", CircuitListView.as_view(), name="api-orchestrator-circuits"),
]
