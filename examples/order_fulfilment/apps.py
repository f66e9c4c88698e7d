from django.apps import AppConfig


class OrderFulfilmentConfig(AppConfig):
    name = "examples.order_fulfilment"
    label = "order_fulfilment"
    verbose_name = "Example: order fulfilment"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The orchestrated flavour's definition and the example's message
        # types: every process (web, worker, services) knows them.
        from examples.order_fulfilment import orchestrated  # noqa: F401
