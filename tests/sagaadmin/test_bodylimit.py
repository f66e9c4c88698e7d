"""The ASGI guard refuses a large body while reading it, not after."""

from __future__ import annotations

import asyncio
from typing import Any

from sagaadmin.bodylimit import BodyLimitMiddleware


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.calls.append(message)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run(
    app: Any, *, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
) -> tuple[list[Any], int]:
    sent: list[Any] = []
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        chunk = chunks[read]
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": read < len(chunks)}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent, read


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    inner = Recorder()
    app = BodyLimitMiddleware(inner, limit=100, prefixes=("/api/",))
    sent, read = run(
        app, path="/api/v1/events", chunks=[b"x" * 50] * 10, headers=[(b"content-length", b"500")]
    )
    assert sent[0]["status"] == 413
    assert read == 0
    assert inner.calls == []
    assert b"problem+json" in dict(sent[0]["headers"])[b"content-type"]


def test_a_streamed_body_is_cut_off_as_soon_as_it_passes_the_limit() -> None:
    inner = Recorder()
    app = BodyLimitMiddleware(inner, limit=100, prefixes=("/api/",))
    # chunked: no content-length, 1,000 chunks of 40 bytes
    sent, read = run(app, path="/api/v1/events", chunks=[b"y" * 40] * 1000, headers=[])
    assert sent[0]["status"] == 413
    assert read == 3  # 120 bytes read, then stop
    assert inner.calls == []


def test_a_body_within_the_limit_reaches_the_app_whole() -> None:
    inner = Recorder()
    app = BodyLimitMiddleware(inner, limit=100, prefixes=("/api/",))
    sent, _ = run(app, path="/api/v1/events", chunks=[b"a" * 30, b"b" * 30], headers=[])
    assert sent[0]["status"] == 200
    assert inner.calls == [
        {"type": "http.request", "body": b"a" * 30 + b"b" * 30, "more_body": False}
    ]


def test_other_paths_are_not_buffered() -> None:
    inner = Recorder()
    app = BodyLimitMiddleware(inner, limit=10, prefixes=("/api/",))
    sent, _ = run(app, path="/admin/login/", chunks=[b"z" * 50], headers=[])
    assert sent[0]["status"] == 200
    assert inner.calls[0]["body"] == b"z" * 50
