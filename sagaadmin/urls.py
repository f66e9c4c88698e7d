from collections.abc import Callable

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import include, path
from django.views import defaults
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from sagaadmin.health import healthz, readyz
from sagaadmin.problems import problem_response
from tracking.api.otlp import otlp_traces_view
from tracking.metrics import metrics_view

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),  # Prometheus (docs/metrics.md)
    path("admin/", admin.site.urls),
    path("api/v1/schema", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/v1/", include("tracking.api.urls")),
    # a standard OTLP/HTTP exporter needs only the base URL: <base>/v1/traces
    path("v1/traces", otlp_traces_view, name="otlp-traces-root"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("tracking.urls")),
]


def _problem_or_page(status: int, slug: str, text: str) -> Callable[..., HttpResponse]:
    """API paths get problem+json; pages get Django's default error page."""

    def view(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
        if request.path.startswith("/api/"):
            return problem_response(status, slug, text)
        if status == 404:
            return defaults.page_not_found(request, exception or Http404())
        return defaults.server_error(request)

    return view


handler404 = _problem_or_page(404, "not-found", "No such resource.")
handler500 = _problem_or_page(500, "internal-error", "The server failed; the error was logged.")
