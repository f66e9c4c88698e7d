from django.apps import AppConfig


class TrackingConfig(AppConfig):
    name = "tracking"
    verbose_name = "Saga tracking"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Tracing of every process (web, worker, demo) when OTEL_* ask for it.
        from sagaadmin.telemetry import setup

        setup()
