from django.urls import path, re_path

from tracking import views

urlpatterns = [
    path("", views.overview_page, name="overview"),
    path("sagas/", views.saga_list_page, name="saga-list"),
    path("live/saga-rows", views.saga_rows_fragment, name="saga-rows"),
    path("live/saga-news", views.saga_news_view, name="saga-news"),
    re_path(r"^sagas/(?P<saga_id>.+)$", views.saga_detail_page, name="saga-detail"),
    re_path(
        r"^actions/(?P<action>[a-z_]{1,32})/(?P<saga_id>.+)$",
        views.saga_action_view,
        name="saga-action",
    ),
    path(
        "operator-actions/<int:action_id>/approve",
        views.operator_action_approve_view,
        name="operator-action-approve",
    ),
    path(
        "operator-actions/<int:action_id>/reject",
        views.operator_action_reject_view,
        name="operator-action-reject",
    ),
    path("bulk/", views.bulk_job_list_page, name="bulk-jobs"),
    path("bulk/preview", views.bulk_preview_view, name="bulk-preview"),
    path("bulk/start", views.bulk_start_view, name="bulk-start"),
    path("bulk/<int:job_id>/", views.bulk_job_page, name="bulk-job"),
    path("bulk/<int:job_id>/cancel", views.bulk_cancel_view, name="bulk-cancel"),
    path("bulk/<int:job_id>/approve", views.bulk_approve_view, name="bulk-approve"),
    path("audit/", views.audit_page, name="audit"),
    path("incidents/", views.incident_list_page, name="incidents"),
    path(
        "incidents/<int:incident_id>/acknowledge",
        views.incident_acknowledge_view,
        name="incident-acknowledge",
    ),
    path(
        "incidents/<int:incident_id>/resolve", views.incident_resolve_view, name="incident-resolve"
    ),
    path("saga-types/", views.saga_types_page, name="saga-types"),
    path("orchestrator/", views.orchestrator_page, name="orchestrator"),
    path("services/", views.services_page, name="services"),
    path("outbox/", views.outbox_page, name="outbox"),
    path("outbox/requeue", views.outbox_requeue_view, name="outbox-requeue"),
    path("services/keys", views.service_key_create_view, name="service-key-create"),
    path(
        "services/keys/<str:prefix>/revoke",
        views.service_key_revoke_view,
        name="service-key-revoke",
    ),
]
