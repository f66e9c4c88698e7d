from importlib import import_module

from django.apps import AppConfig
from django.conf import settings


class OrchestratorConfig(AppConfig):
    name = "orchestrator"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Modules that define sagas (saga_define at import): ORCHESTRATOR_SAGAS.
        for module in settings.ORCHESTRATOR.get("SAGAS", ()):
            import_module(module)
