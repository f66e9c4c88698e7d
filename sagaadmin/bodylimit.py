"""An ASGI guard that enforces the API's body limit *while* the body is read.

Django's ASGI handler spools the whole body before a view runs, so a view can
only refuse a large body after it arrived. This guard answers 413 as soon as
``Content-Length`` or the bytes received so far pass the limit, without reading
the rest, then hands a fully read body to the inner app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sagaadmin.problems import PROBLEM_CONTENT_TYPE, problem_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimitMiddleware:
    def __init__(self, app: App, *, limit: int, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.limit = limit
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._too_large(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        content_type, body = _too_large_body(scope, self.limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


OTLP_PATHS = ("/v1/traces", "/api/v1/otlp/")


def _too_large_body(scope: Scope, limit: int) -> tuple[str, bytes]:
    """problem+json; for the OTLP receiver a google.rpc.Status in the request's encoding."""
    message = f"The body exceeds {limit} bytes."
    if scope["path"].startswith(OTLP_PATHS):
        from tracking import otlp

        sent = dict(scope.get("headers", [])).get(b"content-type", b"").decode("latin-1")
        encoding = sent.split(";")[0].strip().lower()
        encoding = encoding if encoding in otlp.ENCODINGS else otlp.JSON
        return encoding, otlp.status_bytes(encoding, code=8, message=message)
    return PROBLEM_CONTENT_TYPE, problem_bytes(413, "request-too-large", message, limit_bytes=limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
