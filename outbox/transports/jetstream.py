"""NATS JetStream: subject ``<topic>.<type>``, publish acks, broker-side dedupe by outbox id.

nats-py runs on a private event loop in a background thread (as the RabbitMQ
transport does), so the synchronous relay can pipeline a whole batch — every
publish is written before the first ack is awaited — and wait for all acks at
once. Headers: ``Nats-Msg-Id`` = the outbox id (JetStream drops a second copy
within the stream's duplicate window, 2 minutes by default),
``Sagaadmin-Key``, ``Sagaadmin-Version`` and the message's own headers.

Streams: before its first publish to a topic, the transport makes sure a stream
captures ``<topic>.>``. If a stream named after the topic (see
:func:`stream_name`) exists, it is used as it is (an operator may have set
limits on it); else one is created with the server's defaults (file storage,
no limits); if another stream already captures those subjects, that one is
used. Nothing is cached across a "no stream" answer: the next batch checks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from outbox.transports.base import BackgroundLoop, Outgoing, Permanent, Skipped, TransportError

log = logging.getLogger(__name__)
T = TypeVar("T")
CONNECT_TIMEOUT = 5.0
API_TIMEOUT = 10.0  # stream look-up and creation
ACK_TIMEOUT = 30.0  # for the whole batch's publish acks
SUBJECT_OVERLAP = 10065  # JetStream: "subjects overlap with an existing stream"
_TOKEN = re.compile(r"[^\s.*>]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def stream_name(topic: str) -> str:
    """The stream created for ``topic``: the topic with ``.``, ``*``, ``>``, ``/``,
    ``\\`` and whitespace replaced by ``_`` (``orders.eu`` -> ``orders_eu``)."""
    return re.sub(r"[\s.*>/\\]", "_", topic)


def subject(message: Outgoing) -> str:
    return f"{message.topic}.{message.type}"


def _valid_subject(value: str) -> bool:
    return all(_TOKEN.fullmatch(token) for token in value.split("."))


def nats_headers(message: Outgoing) -> dict[str, str]:
    return {
        **message.headers,
        "Nats-Msg-Id": str(message.id),
        "Sagaadmin-Key": message.key,
        "Sagaadmin-Version": str(message.version),
    }


def _problem(message: Outgoing) -> str | None:
    """Why NATS can never take ``message``, or None."""
    if not _valid_subject(message.topic) or not _valid_subject(message.type):
        return (
            f"'{subject(message)}' is not a valid NATS subject (dot-separated non-empty "
            "tokens without whitespace, '*' or '>')"
        )
    for name, value in nats_headers(message).items():
        if not _HEADER_NAME.fullmatch(name):
            return f"header name {name!r} is not an HTTP token"
        if "\r" in value or "\n" in value:
            return f"header {name!r}: line breaks are not allowed in a value"
    return None


class JetStreamTransport:
    def __init__(self, url: str) -> None:
        self.url = url
        self._background = BackgroundLoop("outbox-nats")
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._streams: set[str] = set()  # topics known to have a stream

    async def _context(self) -> JetStreamContext:
        if self._nc is None or self._js is None or not self._nc.is_connected:
            await self._reset()
            last_error: list[Exception] = []

            async def on_error(exc: Exception) -> None:
                last_error[:] = [exc]
                log.warning("NATS connection error: %s: %s", type(exc).__name__, exc)

            try:
                self._nc = await nats.connect(
                    self.url,
                    name="sagaadmin-outbox",
                    connect_timeout=int(CONNECT_TIMEOUT),
                    # a broken connection fails the batch; the next batch connects again
                    allow_reconnect=False,
                    # nats-py tries a server max_reconnect_attempts + 1 times (0: forever)
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.2,
                    error_cb=on_error,
                )
            except nats.errors.NoServersError:
                if last_error:
                    raise last_error[0] from None
                raise
            self._js = self._nc.jetstream(timeout=API_TIMEOUT)
        return self._js

    async def _ensure_stream(self, js: JetStreamContext, topic: str) -> None:
        if topic in self._streams:
            return
        name = stream_name(topic)
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(name=name, subjects=[f"{topic}.>"])
                log.info("created JetStream stream %s for subjects %s.>", name, topic)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != SUBJECT_OVERLAP:
                    raise  # another stream captures <topic>.>: publishes land there
        self._streams.add(topic)

    async def _publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        try:
            js = await self._context()
        except Exception as exc:  # broker away: every message of the batch failed
            await self._reset()
            error = TransportError(f"NATS unreachable: {type(exc).__name__}: {exc}")
            return [error for _ in messages]

        results: list[BaseException | None] = [None] * len(messages)
        stream_errors: dict[str, BaseException] = {}
        for topic in dict.fromkeys(m.topic for m in messages):
            if not _valid_subject(topic):
                continue  # each message gets its Permanent error below
            try:
                await self._ensure_stream(js, topic)
            except Exception as exc:
                stream_errors[topic] = TransportError(
                    f"no JetStream stream for '{topic}.>' ({stream_name(topic)}): "
                    f"{type(exc).__name__}: {exc}"
                )

        failed_keys: set[tuple[str, str]] = set()
        acks: list[tuple[int, asyncio.Future[Any]]] = []
        for i, message in enumerate(messages):
            order_key = (message.topic, message.key)
            if order_key in failed_keys:
                results[i] = Skipped("an earlier message of this key failed")
                continue
            if (problem := _problem(message)) is not None:
                results[i] = Permanent(problem)
            elif message.topic in stream_errors:
                results[i] = stream_errors[message.topic]
            else:
                try:  # written in order; the acks are awaited together below
                    future = await js.publish_async(
                        subject(message),
                        message.payload,
                        wait_stall=ACK_TIMEOUT,
                        headers=nats_headers(message),
                    )
                except nats.errors.MaxPayloadError:
                    results[i] = Permanent("the payload exceeds the server's max_payload")
                except Exception as exc:
                    results[i] = TransportError(f"NATS publish failed: {type(exc).__name__}: {exc}")
                else:
                    acks.append((i, future))
                    continue
            failed_keys.add(order_key)

        if acks:
            await asyncio.wait([f for _, f in acks], timeout=ACK_TIMEOUT)
        for i, future in acks:
            if not future.done() or future.cancelled():
                future.cancel()
                results[i] = TransportError(f"no JetStream ack within {ACK_TIMEOUT:g} s")
            elif (refusal := future.exception()) is not None:
                if isinstance(refusal, nats.js.errors.NoStreamResponseError):
                    self._streams.discard(messages[i].topic)  # deleted since? check again
                results[i] = TransportError(
                    f"JetStream refused: {type(refusal).__name__}: {refusal}"
                )
        return results

    async def _reset(self) -> None:
        self._streams.clear()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):  # already broken; a new one follows
                await nc.close()

    def publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        if not messages:
            return []
        topics = len({m.topic for m in messages})
        timeout = CONNECT_TIMEOUT + 2 * API_TIMEOUT * topics + ACK_TIMEOUT + 5
        try:
            return self._background.run(self._publish(messages), timeout)
        except Exception as exc:
            error = TransportError(f"NATS publish failed: {type(exc).__name__}: {exc}")
            return [error for _ in messages]

    def close(self) -> None:
        try:
            self._background.run(self._reset(), CONNECT_TIMEOUT)
        finally:
            self._background.stop()
