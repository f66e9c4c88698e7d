"""JSON that is safe to embed: ``<``, ``>`` and ``&`` leave as \\u escapes.

Reported strings are data and may contain markup; escaping them in the API's
JSON means no browser can ever sniff a response as HTML.
"""

from __future__ import annotations

from typing import Any

from rest_framework.renderers import JSONRenderer

_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


class SafeJSONRenderer(JSONRenderer):
    def render(
        self, data: Any, accepted_media_type: Any = None, renderer_context: Any = None
    ) -> bytes:
        raw = super().render(data, accepted_media_type, renderer_context)
        return raw.decode().translate(_ESCAPES).encode()
