from django.urls import path, re_path

from tracking.api.ingest import events_view
from tracking.api.views import SagaDetailView, SagaEventsView, SagaListView

urlpatterns = [
    path("events", events_view, name="events"),
    path("sagas", SagaListView.as_view(), name="saga-list"),
    re_path(r"^sagas/(?P<saga_id>.+)/events$", SagaEventsView.as_view(), name="saga-events"),
    re_path(r"^sagas/(?P<saga_id>.+)$", SagaDetailView.as_view(), name="saga-detail"),
]
