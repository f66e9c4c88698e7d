"""RabbitMQ: durable topic exchange per topic, persistent messages, publisher confirms.

aio-pika runs on a private event loop in a background thread, so the
synchronous relay can pipeline a whole batch and wait for all confirms at once.
Exchange = the message's topic; routing key = its type (commands use
``<service>.<action>``); the headers carry the key, type, version and the
message's own headers; ``message_id`` is the outbox id (consumers dedupe on it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TypeVar, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.connection import make_url

from outbox.transports.base import BackgroundLoop, Outgoing, TransportError

T = TypeVar("T")
CONNECT_TIMEOUT = 5.0
CONFIRM_TIMEOUT = 30.0
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


def amqp_properties(m: Outgoing) -> aiormq.spec.Basic.Properties:
    """The AMQP properties of a message: persistent, JSON, its id and type, its headers
    plus ``sagaadmin-key`` and ``sagaadmin-version``."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        headers={**m.headers, "sagaadmin-key": m.key, "sagaadmin-version": m.version},
        message_id=str(m.id),
        message_type=m.type,
    )


class RabbitMQTransport:
    # Two relay loops may publish at once (Relay.loops()): their batches share the
    # connection and the channel (delivery tags and confirms are per channel), opened
    # once under a lock. A nacked message fails alone; any other failure (the channel
    # or connection closed, a confirm timed out) drops the connection the batch used
    # (not a newer one), which fails the other batch in flight on it too: both are
    # retried, as after any broker outage.
    concurrent_publish = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._background = BackgroundLoop("outbox-amqp")
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._opening: asyncio.Lock | None = None  # made on the background loop

    async def _open(self, topics: Sequence[str]) -> tuple[AbstractConnection, aiormq.Channel]:
        """The connection and the (aiormq) channel to publish on, with ``topics``'
        exchanges declared: opened by one batch at a time."""
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            for topic in topics:
                await self._exchange(topic)
            assert self._connection is not None and self._channel is not None
            # the concrete class: its publish can skip waiting for each frame's write
            return self._connection, cast(
                aiormq.Channel, await self._channel.get_underlay_channel()
            )

    async def _connect(self) -> AbstractConnection:
        """``aio_pika.connect``, but a connection that fails to open is closed here: aio-pika
        leaves it to its ``__del__``, which, collected off the loop's thread, only warns
        "coroutine 'Connection.close' was never awaited" (once per failed attempt while
        the broker is away)."""
        connection = aio_pika.Connection(make_url(self.url))
        try:
            await connection.connect(timeout=CONNECT_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return connection

    async def _exchange(self, topic: str) -> AbstractExchange:
        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                self._connection = await self._connect()
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._exchanges.clear()
        exchange = self._exchanges.get(topic)
        if exchange is None:
            exchange = await self._channel.declare_exchange(
                topic, aio_pika.ExchangeType.TOPIC, durable=True
            )
            self._exchanges[topic] = exchange
        return exchange

    async def _publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        try:
            used, channel = await self._open(list(dict.fromkeys(m.topic for m in messages)))
        except Exception as exc:  # broker away: every message of the batch failed
            await self._reset()
            error = TransportError(f"RabbitMQ unreachable: {type(exc).__name__}: {exc}")
            return [error for _ in messages]
        # aiormq's publish (aio-pika's own layer below its Message and Exchange), not
        # waiting for each frame to be written: the confirms are awaited together.
        # A fifth less CPU per message than Exchange.publish(Message(...)).
        sends = [
            channel.basic_publish(
                m.payload,
                exchange=m.topic,
                routing_key=m.type,
                properties=amqp_properties(m),
                # Topic semantics: a message no queue is bound for is dropped by the
                # broker (and confirmed); declare and bind consumer queues first.
                mandatory=False,
                timeout=CONFIRM_TIMEOUT,
                wait=False,
            )
            for m in messages
        ]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        results: list[BaseException | None] = [
            TransportError(f"RabbitMQ did not confirm: {type(o).__name__}: {o}")
            if isinstance(o, BaseException)
            else None
            for o in outcomes
        ]
        if any(
            isinstance(o, BaseException) and not isinstance(o, aiormq.exceptions.DeliveryError)
            for o in outcomes
        ):
            await self._reset(used)
        return results

    async def _reset(self, used: AbstractConnection | None = None) -> None:
        """Drop the connection (``used``: only if it is still the current one; another
        batch may have opened a new one since)."""
        if used is not None and used is not self._connection:
            return
        self._exchanges.clear()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):  # already broken; a new one follows
                await connection.close()

    def publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        if not messages:
            return []
        try:
            return self._background.run(
                self._publish(messages), CONNECT_TIMEOUT + CONFIRM_TIMEOUT + 5
            )
        except Exception as exc:
            error = TransportError(f"RabbitMQ publish failed: {type(exc).__name__}: {exc}")
            return [error for _ in messages]

    def close(self) -> None:
        try:
            self._background.run(self._reset(), CONNECT_TIMEOUT)
        finally:
            self._background.stop()
