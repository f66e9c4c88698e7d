"""ASGI entry point: HTTP (Django) and websockets (Channels), behind a body-size guard."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaadmin.settings.base")

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.core.asgi import get_asgi_application

django_app = get_asgi_application()

from django.conf import settings  # noqa: E402

from sagaadmin.bodylimit import BodyLimitMiddleware  # noqa: E402
from sagaadmin.gc_tuning import gc_tune  # noqa: E402
from tracking.api.fastpath import IngestRouter  # noqa: E402
from tracking.routing import websocket_urlpatterns  # noqa: E402

router = ProtocolTypeRouter(
    {
        "http": django_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
if settings.SAGAADMIN["INGEST_FASTPATH"]:
    router = IngestRouter(router)
application = BodyLimitMiddleware(
    router,
    limit=settings.SAGAADMIN["INGEST_MAX_BODY_BYTES"],
    prefixes=("/api/", "/v1/"),
)
gc_tune()  # last: everything above lives as long as the process (ADR 0017)
