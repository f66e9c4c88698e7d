"""Consumer runners: take messages from a broker, apply them through the inbox, ack after commit.

Every runner turns each delivery into an :class:`~outbox.inbox.Incoming` (payload
upcast to the current version), applies it with :func:`outbox.inbox.inbox_apply`
on one dedicated worker thread (the handler uses the ORM; one thread keeps the
delivery order and one database connection) and acknowledges it only after that
transaction committed. A handler that raises leaves the message unacknowledged:
it comes back after ``retry_delay`` seconds. A message of a version this
deployment cannot upcast (or that cannot be decoded at all) is dead-lettered:
kept, not lost. Each runner consumes until its ``stop`` event is set and
finishes the message in hand first.

``run_rabbitmq_consumer`` declares a durable queue ``<consumer>`` bound to the
topic's exchange; a message it cannot upcast is rejected without requeue and
lands in the ``sagaadmin.dead`` queue (dead-letter exchange); a handler that
raises gets the message back (requeued) after ``retry_delay`` seconds.

``run_redis_consumer`` reads the topic's stream through a consumer group named
``<consumer>``; dead letters go to the stream ``sagaadmin.dead``.

``run_nats_consumer`` pulls from a durable JetStream consumer named
``<consumer>`` on the topic's stream; dead letters go to
``sagaadmin.dead.<subject>`` (stream ``sagaadmin_dead``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aio_pika
import nats
import nats.errors
import nats.js.errors
import redis
import redis.asyncio
from aio_pika.abc import AbstractIncomingMessage
from django.db import close_old_connections, connections
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from redis.backoff import NoBackoff
from redis.retry import Retry

from outbox.inbox import Incoming, inbox_apply, incoming
from outbox.transports.jetstream import SUBJECT_OVERLAP, stream_name
from outbox.versions import UnknownVersion
from sagaadmin.telemetry import consumer_span

log = logging.getLogger(__name__)
DEAD_EXCHANGE = "sagaadmin.dead"


def from_amqp(message: AbstractIncomingMessage) -> Incoming:
    headers = dict(message.headers or {})
    key = str(headers.pop("sagaadmin-key", ""))
    version = int(str(headers.pop("sagaadmin-version", 1)))
    return incoming(
        id=str(message.message_id or ""),
        topic=message.exchange or "",
        key=key,
        type=message.type or message.routing_key or "",
        version=version,
        payload=json.loads(message.body),
        headers=headers,
    )


def _apply(consumer: str, message: Incoming, handler: Callable[[Incoming], None]) -> bool:
    close_old_connections()  # a broken or expired connection is replaced, not reused
    try:
        with consumer_span(message.topic, message.id, message.headers, consumer):
            return inbox_apply(consumer, message, handler)
    finally:
        # With a connection pool, hand the connection back: an idle consumer holds
        # none, so many consumers fit one process's pool (cheap: a check-in).
        if connections["default"].settings_dict.get("OPTIONS", {}).get("pool"):
            close_old_connections()


async def _consume(
    url: str,
    *,
    consumer: str,
    topic: str,
    binding: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    prefetch: int,
    retry_delay: float,
) -> None:
    # One thread applies the messages, in delivery order, on one database connection.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"consumer-{consumer}")
    try:
        # Robust: after a lost connection it reconnects and restores the channel, the
        # declarations and the consumer (a plain one left the runner idle until stop).
        connection = await aio_pika.connect_robust(url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            dead = await channel.declare_exchange(
                DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            dead_queue = await channel.declare_queue(DEAD_EXCHANGE, durable=True)
            await dead_queue.bind(dead)
            exchange = await channel.declare_exchange(
                topic, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(
                consumer, durable=True, arguments={"x-dead-letter-exchange": DEAD_EXCHANGE}
            )
            await queue.bind(exchange, routing_key=binding)

            # aio-pika runs a task per delivery; a local queue and one worker
            # apply them strictly in delivery order (per-key order survives a retry).
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            tag = await queue.consume(inbox.put)
            while not stop.is_set():
                try:
                    delivery = await asyncio.wait_for(inbox.get(), timeout=0.2)
                except TimeoutError:
                    continue
                await _handle(delivery, consumer, handler, retry_delay, executor, stop)
            await queue.cancel(tag)
            # deliveries taken but not applied go back to the queue
            while not inbox.empty():
                await inbox.get_nowait().nack(requeue=True)
    finally:
        executor.submit(connections.close_all).result()
        executor.shutdown()


async def _handle(
    delivery: AbstractIncomingMessage,
    consumer: str,
    handler: Callable[[Incoming], None],
    retry_delay: float,
    executor: ThreadPoolExecutor,
    stop: threading.Event,
) -> None:
    try:
        if not delivery.message_id:
            raise ValueError("no message_id: the inbox cannot tell it from other messages")
        message = from_amqp(delivery)
    except (UnknownVersion, ValueError) as exc:
        log.error("consumer %s: dead-lettering %s: %s", consumer, delivery.message_id, exc)
        await delivery.reject(requeue=False)
        return
    loop = asyncio.get_running_loop()
    while True:  # retried here, not requeued: later messages must not overtake it
        try:
            await loop.run_in_executor(executor, _apply, consumer, message, handler)
        except Exception:
            log.exception("consumer %s: handler failed for %s; retrying", consumer, message.id)
            await _pause(stop, retry_delay)
            if stop.is_set():
                await delivery.nack(requeue=True)
                return
            continue
        await delivery.ack()  # after the inbox transaction committed
        return


def run_rabbitmq_consumer(
    url: str,
    *,
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    binding: str = "#",
    prefetch: int = 50,
    retry_delay: float = 1.0,
) -> None:
    """Consume until ``stop`` is set (the delivery in hand is finished first).

    A handler that raises is retried after ``retry_delay`` until it succeeds
    (or ``stop``), so a key's later messages never overtake a failed one.
    """
    asyncio.run(
        _consume(
            url,
            consumer=consumer,
            topic=topic,
            binding=binding,
            handler=handler,
            stop=stop,
            prefetch=prefetch,
            retry_delay=retry_delay,
        )
    )


async def _pause(stop: threading.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not stop.is_set() and (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(left, 0.1))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- Redis Streams ----------------------------------------------------------------------

DEAD_STREAM = "sagaadmin.dead"  # Redis: the stream dead letters are appended to
REDIS_CONNECT_TIMEOUT = 5.0
REDIS_REPLY_TIMEOUT = 30.0  # on top of the XREADGROUP block time


def from_redis(stream: str, fields: Mapping[Any, Any]) -> Incoming:
    """A stream entry written by the Redis Streams transport, as an :class:`Incoming`.

    ``ValueError`` when the entry is not one (no ``id``, ``type`` or ``payload``,
    bad JSON, a version that is not a number); ``UnknownVersion`` when its version
    cannot be upcast.
    """
    entry = {_text(name): value for name, value in fields.items()}
    try:
        message_id, type_, payload = (_text(entry[f]) for f in ("id", "type", "payload"))
    except KeyError as exc:
        raise ValueError(f"not an outbox entry: no field {exc.args[0]!r}") from None
    if not message_id:
        raise ValueError("not an outbox entry: the field 'id' is empty")
    headers = json.loads(entry.get("headers") or "{}")
    if not isinstance(headers, dict):
        raise ValueError("the field 'headers' is not a JSON object")
    return incoming(
        id=message_id,
        topic=stream,
        key=_text(entry.get("key", "")),
        type=type_,
        version=int(_text(entry.get("version", "1"))),
        payload=json.loads(payload),
        headers=headers,
    )


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREADGROUP's reply (one stream) as ``(entry id, fields)`` pairs, in stream order."""
    return [
        (entry_id, dict(fields or {})) for _, entries in reply or [] for entry_id, fields in entries
    ]


async def _ensure_group(client: redis.asyncio.Redis, topic: str, consumer: str) -> None:
    """The stream and its group ``consumer`` (from the stream's first entry) exist."""
    try:
        await client.xgroup_create(topic, consumer, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise  # else: it exists already (its position is kept)


async def _consume_redis(
    url: str,
    *,
    consumer: str,
    member: str,
    topic: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    block_ms: int,
    batch: int,
    retry_delay: float,
) -> None:
    # One thread applies the messages, in stream order, on one database connection.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"consumer-{consumer}")
    client = redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=block_ms / 1000 + REDIS_REPLY_TIMEOUT,
        # No silent retry: a read whose reply was lost leaves its entries pending for
        # this member, and only reading ID 0 (below) would ever bring them back.
        retry=Retry(NoBackoff(), 0),
    )
    try:
        await _ensure_group(client, topic, consumer)  # Redis away at start: raise
        group = True
        # First this member's own pending entries (read from ID 0): delivered before a
        # crash, a stop or a failure, never acknowledged. Then new ones (">").
        backlog = True
        while not stop.is_set():
            try:
                if not group:
                    await _ensure_group(client, topic, consumer)
                    group = True
                reply = await client.xreadgroup(
                    consumer,
                    member,
                    {topic: "0" if backlog else ">"},
                    count=batch,
                    block=None if backlog else block_ms,
                )
                entries = _stream_entries(reply)
                if backlog and not entries:
                    backlog = False
                    continue
                for entry_id, fields in entries:
                    if stop.is_set():
                        break  # the rest stays pending: read again at the next start
                    applied = await _handle_entry(
                        client, executor, entry_id, fields, consumer, topic, handler, retry_delay
                    )
                    if not applied:  # it stays pending, and so does the rest of the batch
                        await _pause(stop, retry_delay)
                        backlog = True  # so the failed entry comes first again: stream order
                        break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning(
                    "consumer %s: Redis: %s; reading again in %g s", consumer, exc, retry_delay
                )
                backlog = True  # a lost reply or XACK: those entries are pending
                await _pause(stop, retry_delay)
            except redis.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                log.warning("consumer %s: stream %s or its group is gone: %s", consumer, topic, exc)
                group, backlog = False, True
                await _pause(stop, retry_delay)
    finally:
        await client.aclose()
        executor.submit(connections.close_all).result()
        executor.shutdown()


async def _handle_entry(
    client: redis.asyncio.Redis,
    executor: ThreadPoolExecutor,
    entry_id: bytes,
    fields: dict[bytes, bytes],
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    retry_delay: float,
) -> bool:
    """Apply one entry and XACK it; False when it stays pending (to be read again)."""
    if not fields:  # deleted from the stream (XDEL, XTRIM) while pending: nothing left to apply
        log.warning(
            "consumer %s: %s entry %s is gone; acknowledged", consumer, topic, _text(entry_id)
        )
        await client.xack(topic, consumer, entry_id)
        return True
    try:
        message = from_redis(topic, fields)
    except (UnknownVersion, ValueError) as exc:
        log.error(
            "consumer %s: dead-lettering %s entry %s: %s", consumer, topic, _text(entry_id), exc
        )
        dead: dict[Any, Any] = {**fields, "error": str(exc), "stream": topic, "consumer": consumer}
        try:  # appended before the XACK: a crash in between appends it twice, never zero times
            await client.xadd(DEAD_STREAM, dead)
        except redis.ResponseError as refused:  # say, sagaadmin.dead is not a stream
            log.error("consumer %s: %s refused the dead letter: %s", consumer, DEAD_STREAM, refused)
            return False
        await client.xack(topic, consumer, entry_id)
        return True
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, _apply, consumer, message, handler)
    except Exception:
        log.exception(
            "consumer %s: handler failed for %s; again in %g s", consumer, message.id, retry_delay
        )
        return False
    await client.xack(topic, consumer, entry_id)  # after the inbox transaction committed
    return True


def run_redis_consumer(
    url: str,
    *,
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    block_ms: int = 500,
    batch: int = 100,
    retry_delay: float = 1.0,
    member: str | None = None,
) -> None:
    """Consume the stream ``topic`` until ``stop`` is set (the entry in hand is finished first).

    A consumer group named ``consumer`` (created at the stream's start if missing,
    with the stream itself: ``MKSTREAM``) reads it; this process reads as the group
    member ``member`` (default: ``consumer``), so a restart finds the entries it
    had not acknowledged. Entries are applied one by one in stream order and
    ``XACK``-ed after the inbox transaction committed. On start, and after a
    handler failure (once ``retry_delay`` passed) or a lost connection, the
    member's own pending entries are read again from ID ``0`` before new ones:
    the failed entry is retried first, so stream order (hence per-key order) is
    kept — and an entry that keeps failing holds the stream back. An entry that
    cannot be decoded or upcast is appended to the stream ``sagaadmin.dead``
    (its fields plus ``error``, ``stream`` and ``consumer``), then acknowledged.
    Redis unreachable at start raises; later outages are waited out.
    """
    asyncio.run(
        _consume_redis(
            url,
            consumer=consumer,
            member=member or consumer,
            topic=topic,
            handler=handler,
            stop=stop,
            block_ms=block_ms,
            batch=batch,
            retry_delay=retry_delay,
        )
    )


# --- NATS JetStream ---------------------------------------------------------------------

DEAD_SUBJECT = "sagaadmin.dead"  # NATS: dead letters are published to sagaadmin.dead.<subject>
DEAD_JETSTREAM = "sagaadmin_dead"  # the stream capturing sagaadmin.dead.>
NATS_CONNECT_TIMEOUT = 5
NATS_API_TIMEOUT = 10.0
FETCH_SECONDS = 0.5  # one pull's wait for messages: how soon ``stop`` is noticed when idle


def from_nats(topic: str, msg: Msg) -> Incoming:
    """A JetStream message published by the transport (subject ``<topic>.<type>``)."""
    headers = dict(msg.headers or {})
    message_id = headers.pop("Nats-Msg-Id", "")
    if not message_id:
        raise ValueError("not an outbox message: no Nats-Msg-Id header")
    key = headers.pop("Sagaadmin-Key", "")
    version = int(headers.pop("Sagaadmin-Version", "1"))
    prefix = f"{topic}."
    return incoming(
        id=message_id,
        topic=topic,
        key=key,
        type=msg.subject.removeprefix(prefix),
        version=version,
        payload=json.loads(msg.data),
        headers=headers,
    )


async def _ensure_stream(js: JetStreamContext, name: str, prefix: str) -> str:
    """The stream capturing ``<prefix>.>``, created as ``name`` when none does (as the
    transport does: a stream named ``name`` is used as it is, else one is created with
    the server's defaults, else the stream that already captures those subjects)."""
    try:
        await js.stream_info(name)
        return name
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(name=name, subjects=[f"{prefix}.>"])
        return name
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != SUBJECT_OVERLAP:
            raise
    return await js.find_stream_name_by_subject(f"{prefix}.>")


async def _nats_connect(url: str, consumer: str) -> NATS:
    last_error: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        last_error[:] = [exc]
        log.warning("consumer %s: NATS: %s: %s", consumer, type(exc).__name__, exc)

    try:
        return await nats.connect(
            url,
            name=f"sagaadmin-consumer-{consumer}",
            connect_timeout=NATS_CONNECT_TIMEOUT,
            # a broken connection ends the session; the runner connects again itself
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=on_error,
        )
    except nats.errors.NoServersError:
        if last_error:
            raise last_error[0] from None
        raise


async def _consume_nats(
    url: str,
    *,
    consumer: str,
    topic: str,
    subject: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    batch: int,
    retry_delay: float,
) -> None:
    # One thread applies the messages, in delivery order, on one database connection.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"consumer-{consumer}")
    started = False
    try:
        while not stop.is_set():
            nc: NATS | None = None
            try:
                nc = await _nats_connect(url, consumer)
                js = nc.jetstream(timeout=NATS_API_TIMEOUT)
                await _ensure_stream(js, DEAD_JETSTREAM, DEAD_SUBJECT)
                stream = await _ensure_stream(js, stream_name(topic), topic)
                sub = await js.pull_subscribe(
                    subject,
                    durable=consumer,
                    stream=stream,
                    config=ConsumerConfig(
                        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL
                    ),
                )
                ack_wait = (await sub.consumer_info()).config.ack_wait or 30.0
                started = True
                await _pull(
                    nc,
                    js,
                    sub,
                    consumer,
                    topic,
                    handler,
                    stop,
                    batch,
                    retry_delay,
                    ack_wait,
                    executor,
                )
            except (nats.errors.Error, OSError) as exc:  # OSError: refused, timed out
                if not started:
                    raise  # NATS away or misconfigured at start
                log.warning(
                    "consumer %s: NATS: %s: %s; connecting again in %g s",
                    consumer,
                    type(exc).__name__,
                    exc,
                    retry_delay,
                )
                await _pause(stop, retry_delay)
            finally:
                if nc is not None and not nc.is_closed:
                    with contextlib.suppress(Exception):
                        await nc.close()  # flushes the acks written so far
    finally:
        executor.submit(connections.close_all).result()
        executor.shutdown()


async def _pull(
    nc: NATS,
    js: JetStreamContext,
    sub: JetStreamContext.PullSubscription,
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    batch: int,
    retry_delay: float,
    ack_wait: float,
    executor: ThreadPoolExecutor,
) -> None:
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch, timeout=FETCH_SECONDS)
        except TimeoutError:  # nothing to do (nats-py's timeouts are TimeoutErrors too)
            if nc.is_closed:
                raise nats.errors.ConnectionClosedError from None
            continue
        unfinished = deque(msgs)
        # A batch's messages are all delivered at once: keep the ones waiting their turn
        # from being redelivered when the batch takes longer than the ack wait.
        keepalive = asyncio.create_task(_keep_alive(unfinished, ack_wait / 3))
        try:
            while unfinished and not stop.is_set():
                done = await _handle_msg(
                    js, unfinished[0], consumer, topic, handler, retry_delay, executor
                )
                unfinished.popleft()
                if not done:  # naked: back after retry_delay; the rest of the batch behind it
                    for msg in unfinished:
                        await msg.nak(delay=retry_delay)
                    unfinished.clear()
                    await _pause(stop, retry_delay)
            for msg in unfinished:  # stopping: the rest goes back at once
                await msg.nak()
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)


async def _keep_alive(unfinished: deque[Msg], every: float) -> None:
    while True:
        await asyncio.sleep(every)
        for msg in list(unfinished):
            if not msg.is_acked:
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()  # resets the message's ack timer


async def _handle_msg(
    js: JetStreamContext,
    msg: Msg,
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    retry_delay: float,
    executor: ThreadPoolExecutor,
) -> bool:
    """Apply one message and ack it; False when it was naked (to come back later)."""
    try:
        message = from_nats(topic, msg)
    except (UnknownVersion, ValueError) as exc:
        return await _dead_letter(js, msg, consumer, exc, retry_delay)
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, _apply, consumer, message, handler)
    except Exception:
        log.exception(
            "consumer %s: handler failed for %s; again in %g s", consumer, message.id, retry_delay
        )
        await msg.nak(delay=retry_delay)
        return False
    await msg.ack()  # after the inbox transaction committed
    return True


async def _dead_letter(
    js: JetStreamContext, msg: Msg, consumer: str, exc: Exception, retry_delay: float
) -> bool:
    """Publish ``msg`` to ``sagaadmin.dead.<subject>`` and terminate it (no redelivery)."""
    log.error("consumer %s: dead-lettering %s: %s", consumer, msg.subject, exc)
    headers = dict(msg.headers or {})
    error = " ".join(str(exc).split())[:1000]  # a header value: one line
    headers.update({"Sagaadmin-Error": error, "Sagaadmin-Consumer": consumer})
    if original := headers.get("Nats-Msg-Id"):
        # JetStream keeps one copy per message *and consumer* (its dedupe is by this id)
        headers.update({"Sagaadmin-Id": original, "Nats-Msg-Id": f"{original}:{consumer}"})
    try:
        await js.publish(f"{DEAD_SUBJECT}.{msg.subject}", msg.data, headers=headers)
    except nats.errors.Error as refused:  # not stored: keep the message, try again later
        log.error("consumer %s: could not dead-letter %s: %s", consumer, msg.subject, refused)
        await msg.nak(delay=retry_delay)
        return False
    await msg.term()
    return True


def run_nats_consumer(
    url: str,
    *,
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    subject: str | None = None,
    batch: int = 100,
    retry_delay: float = 1.0,
) -> None:
    """Consume the topic's JetStream stream until ``stop`` is set (the message in hand first).

    A durable pull consumer named ``consumer`` (explicit ack, from the stream's
    start; created if missing, else used as it is) on the stream the transport
    publishes ``<topic>.>`` to (created if missing, as the transport would),
    filtered by ``subject`` (default ``<topic>.>``). Messages are fetched up to
    ``batch`` at a time and applied one by one, ``ack()``-ed after the inbox
    transaction committed. A handler failure ``nak``s the message with
    ``delay=retry_delay`` and the rest of the batch behind it with the same
    delay, and the runner waits ``retry_delay`` before it pulls again, so the
    failed message is retried first (JetStream redelivers in stream order).
    A message that cannot be decoded or upcast is published to
    ``sagaadmin.dead.<subject>`` (stream ``sagaadmin_dead``, ensured at start),
    then terminated (``term()``). NATS unreachable at start raises; later the
    runner connects again every ``retry_delay`` seconds.
    """
    asyncio.run(
        _consume_nats(
            url,
            consumer=consumer,
            topic=topic,
            subject=subject or f"{topic}.>",
            handler=handler,
            stop=stop,
            batch=batch,
            retry_delay=retry_delay,
        )
    )


def run_inprocess_consumer(
    *,
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
) -> None:
    """The embedded default: apply each message the in-process transport delivers on ``topic``.

    The relay of this process calls the handler (through the inbox) while it
    publishes; a handler that raises fails the publish, so the relay retries
    the message with its backoff.
    """
    from outbox.transports.inprocess import subscribe

    def deliver(message: Any) -> None:
        payload = message.payload
        # inbox_apply, not _apply: this runs in the relay's thread, whose
        # connection must not be closed under it.
        with consumer_span(message.topic, str(message.id), message.headers, consumer):
            inbox_apply(
                consumer,
                incoming(
                    id=str(message.id),
                    topic=message.topic,
                    key=message.key,
                    type=message.type,
                    version=message.version,
                    payload=json.loads(payload) if isinstance(payload, str | bytes) else payload,
                    headers=message.headers,
                ),
                handler,
            )

    unsubscribe = subscribe(topic, deliver)
    try:
        stop.wait()
    finally:
        unsubscribe()


def run_consumer(
    url: str,
    *,
    consumer: str,
    topic: str,
    handler: Callable[[Incoming], None],
    stop: threading.Event,
    types: str = "#",
) -> None:
    """Consume ``topic`` from the broker ``url`` names (``BROKER_URL``'s schemes) until ``stop``.

    ``types``: which message types to take, as a RabbitMQ binding pattern
    (``payment.#``); on RabbitMQ the broker filters, on NATS the subject, on
    Redis and in-process every message of the topic arrives (filter in the
    handler).
    """
    scheme = url.split(":", 1)[0]
    kwargs: dict[str, Any] = {"consumer": consumer, "topic": topic, "handler": handler}
    if scheme in ("amqp", "amqps"):
        run_rabbitmq_consumer(url, stop=stop, binding=types, **kwargs)
    elif scheme in ("redis", "rediss"):
        run_redis_consumer(url, stop=stop, **kwargs)
    elif scheme in ("nats", "tls"):
        subject = f"{topic}.>" if types == "#" else f"{topic}.{types.replace('#', '>')}"
        run_nats_consumer(url, stop=stop, subject=subject, **kwargs)
    elif scheme == "inprocess":
        run_inprocess_consumer(stop=stop, **kwargs)
    else:
        raise ValueError(f"no consumer for {scheme}:// (amqp, redis, nats or inprocess)")
