"""The Redis Streams and NATS JetStream consumer runners against the real servers.

Messages go out through the real relay and transport; the runner applies them
through the inbox in a thread of its own. Checked for each broker: every message
applied exactly once and each key in order, a duplicate delivery without a second
effect, a failing handler retried (order kept), an unknown version dead-lettered,
entries left unacknowledged by a crash applied on start (Redis), a stop that finishes
the message in hand, a connection cut mid-run waited out (RabbitMQ's runner too), a
broker away at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.db import transaction

import outbox
from outbox import versions
from outbox.consumers import (
    DEAD_JETSTREAM,
    DEAD_STREAM,
    DEAD_SUBJECT,
    run_nats_consumer,
    run_rabbitmq_consumer,
    run_redis_consumer,
)
from outbox.inbox import Incoming, inbox_apply, incoming
from outbox.models import InboxMessage, OutboxMessage
from outbox.relay import Relay, RelaySettings
from outbox.transports import transport_from_url
from outbox.transports.jetstream import stream_name
from tests.conftest import need
from tests.outbox import test_nats_transport as nats_test
from tests.outbox import test_redis_transport as redis_test
from tests.outbox.test_rabbitmq import AMQP_URL

REDIS_URL = redis_test.REDIS_URL
NATS_URL = nats_test.NATS_URL
CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)
TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
pytestmark = pytest.mark.django_db(transaction=True)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _relay(url: str) -> None:
    """Publish everything pending through the real relay and transport."""
    transport = transport_from_url(url)
    try:
        result = Relay(transport, CFG).drain()
    finally:
        transport.close()
    assert result.retried == 0 and result.dead == 0, result


def _publish(topic: str, count: int, keys: int, type: str = "order.paid") -> None:
    with transaction.atomic():
        for n in range(count):
            outbox.publish(
                topic=topic,
                key=f"k{n % keys}",
                type=type,
                payload={"n": n},
                version=2,  # a type nobody registered: passes through as it is
                headers={"traceparent": TRACEPARENT},
            )


class Recorder:
    """The handler: records each application; fails the first attempt of ``fail_once``."""

    def __init__(self, fail_once: frozenset[int] = frozenset()) -> None:
        self.applied: list[Incoming] = []
        self.attempts: list[int] = []
        self.fail_once = set(fail_once)

    def __call__(self, message: Incoming) -> None:  # in the inbox transaction
        n = message.payload["n"]
        self.attempts.append(n)
        if n in self.fail_once:
            self.fail_once.discard(n)
            raise RuntimeError(f"downstream away for n={n}")
        self.applied.append(message)

    def by_key(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for message in self.applied:
            out.setdefault(message.key, []).append(message.payload["n"])
        return out


@contextlib.contextmanager
def _running(run: Callable[..., None], **kwargs: Any) -> Iterator[threading.Event]:
    """Run a consumer runner in a thread; stop it, and check it stopped cleanly, after."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(stop=stop, **kwargs)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-consumer", daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "the runner did not stop within 10 s"
    assert errors == []


def _wait(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _inbox(consumer: str) -> int:
    """Read after the runner stopped: SQLite's shared in-memory test database locks a
    table for a reader while the runner's thread writes it ("database table is locked")."""
    return InboxMessage.objects.filter(consumer=consumer).count()


def _check_fields(message: Incoming, topic: str) -> None:
    stored = OutboxMessage.objects.get(message_id=message.id)
    assert (message.topic, message.key, message.type) == (topic, stored.aggregateid, "order.paid")
    assert (message.version, message.headers) == (2, {"traceparent": TRACEPARENT})
    assert message.payload == json.loads(stored.payload)


@pytest.fixture
def unknown_type() -> Iterator[str]:
    """A message type name; registered by the test, unregistered afterwards."""
    name = f"test.consumer.{uuid.uuid4().hex[:8]}"
    yield name
    versions._registry.pop(name, None)


# --- Redis Streams -----------------------------------------------------------------------


@pytest.fixture
def stream() -> Iterator[str]:
    need(redis_test._reachable(), f"needs Redis at {REDIS_URL}")
    name = f"test.consumer.{uuid.uuid4().hex[:8]}"
    yield name
    client = redis_test._client()
    client.delete(name)
    for entry_id, fields in client.xrange(DEAD_STREAM):  # only this test's dead letters
        if fields.get(b"stream") == name.encode():
            client.xdel(DEAD_STREAM, entry_id)


def _settled(stream: str, group: str) -> bool:
    """Every entry of ``stream`` delivered to ``group`` and acknowledged."""
    client = redis_test._client()
    info = next(g for g in client.xinfo_groups(stream) if g["name"] == group.encode())
    last = client.xrevrange(stream, count=1)
    return info["pending"] == 0 and bool(last) and info["last-delivered-id"] == last[0][0]


def test_redis_each_message_is_applied_once_in_key_order_and_a_duplicate_changes_nothing(
    stream,
) -> None:
    consumer = _unique("billing")
    _publish(stream, 40, keys=4)
    _relay(REDIS_URL)
    client = redis_test._client()
    entries = client.xrange(stream)
    client.xadd(stream, entries[5][1])  # the relay sent one again (it died before its commit)
    client.xadd(stream, entries[20][1])
    handler = Recorder()

    with _running(
        run_redis_consumer, url=REDIS_URL, consumer=consumer, topic=stream, handler=handler
    ):
        _wait(lambda: len(handler.applied) == 40 and _settled(stream, consumer), "40 applied")

    assert _inbox(consumer) == 40
    assert len(handler.applied) == 40  # 42 deliveries, 40 effects
    assert len({m.id for m in handler.applied}) == 40
    assert handler.by_key() == {f"k{k}": list(range(k, 40, 4)) for k in range(4)}
    _check_fields(handler.applied[0], stream)


def test_redis_a_failing_handler_is_retried_first_and_key_order_is_kept(stream) -> None:
    consumer = _unique("billing")
    _publish(stream, 10, keys=2)
    _relay(REDIS_URL)
    handler = Recorder(fail_once=frozenset({3}))

    began = time.monotonic()
    with _running(
        run_redis_consumer,
        url=REDIS_URL,
        consumer=consumer,
        topic=stream,
        handler=handler,
        retry_delay=0.3,
    ):
        _wait(lambda: len(handler.applied) == 10 and _settled(stream, consumer), "10 applied")

    assert _inbox(consumer) == 10
    assert time.monotonic() - began >= 0.3  # retried after retry_delay
    assert handler.attempts.count(3) == 2
    assert [m.payload["n"] for m in handler.applied] == list(range(10))  # stream order
    assert handler.by_key() == {"k0": [0, 2, 4, 6, 8], "k1": [1, 3, 5, 7, 9]}


def test_redis_an_unknown_version_goes_to_the_dead_stream(stream, unknown_type) -> None:
    consumer = _unique("billing")
    with transaction.atomic():  # a newer publisher: version 9, which this consumer cannot read
        outbox.publish(topic=stream, key="k", type=unknown_type, payload={"n": 0}, version=9)
        outbox.publish(topic=stream, key="k", type="order.paid", payload={"n": 1})
    _relay(REDIS_URL)
    versions.message_type(unknown_type, current=2)  # the consumer's deployment knows 1 and 2
    dead_id = str(OutboxMessage.objects.get(type=unknown_type).message_id)
    original = dict(redis_test._client().xrange(stream)[0][1])
    handler = Recorder()

    with _running(
        run_redis_consumer, url=REDIS_URL, consumer=consumer, topic=stream, handler=handler
    ):
        _wait(lambda: len(handler.applied) == 1 and _settled(stream, consumer), "1 applied")

    assert _inbox(consumer) == 1
    assert [m.payload["n"] for m in handler.applied] == [1]  # the key goes on after it
    assert not InboxMessage.objects.filter(message_id=dead_id).exists()
    dead = [
        fields
        for _, fields in redis_test._client().xrange(DEAD_STREAM)
        if fields.get(b"stream") == stream.encode()
    ]
    assert len(dead) == 1
    assert dead[0][b"id"].decode() == dead_id
    assert "unknown version 9" in dead[0][b"error"].decode()
    assert dead[0][b"consumer"].decode() == consumer
    assert {k: v for k, v in dead[0].items() if k in original} == original  # kept whole


def test_redis_entries_left_pending_by_a_crash_are_applied_on_start(stream) -> None:
    consumer = _unique("billing")
    _publish(stream, 6, keys=2)
    _relay(REDIS_URL)
    client = redis_test._client()
    client.xgroup_create(stream, consumer, id="0")
    # A previous run read everything, applied the first entry, and died before any XACK.
    (_, delivered), *_ = client.xreadgroup(consumer, consumer, {stream: ">"}, count=10)
    first = delivered[0][1]
    assert inbox_apply(
        consumer,
        incoming(
            id=first[b"id"].decode(),
            topic=stream,
            key=first[b"key"].decode(),
            type=first[b"type"].decode(),
            version=int(first[b"version"]),
            payload=json.loads(first[b"payload"]),
        ),
        lambda message: None,
    )
    assert client.xpending(stream, consumer)["pending"] == 6
    handler = Recorder()

    with _running(
        run_redis_consumer, url=REDIS_URL, consumer=consumer, topic=stream, handler=handler
    ):
        _wait(lambda: len(handler.applied) == 5 and _settled(stream, consumer), "5 applied")

    assert _inbox(consumer) == 6
    assert [m.payload["n"] for m in handler.applied] == [1, 2, 3, 4, 5]  # the first: no again


# --- NATS JetStream ----------------------------------------------------------------------


@pytest.fixture
def topic() -> Iterator[str]:
    need(nats_test._reachable(), f"needs NATS with JetStream at {NATS_URL}")
    name = f"test.consumer.{uuid.uuid4().hex[:8]}"
    yield name

    async def delete(js: Any) -> None:
        import nats.js.errors

        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream_name(name))  # and its consumers
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.purge_stream(DEAD_JETSTREAM, subject=f"{DEAD_SUBJECT}.{name}.>")

    nats_test._js(delete)


def _nats_settled(topic: str, consumer: str) -> bool:
    """Every message of the topic's stream delivered to ``consumer`` and acknowledged."""

    async def info(js: Any) -> Any:
        return await js.consumer_info(stream_name(topic), consumer)

    state = nats_test._js(info)
    return state.num_pending == 0 and state.num_ack_pending == 0


def test_nats_each_message_is_applied_once_in_key_order_and_a_redelivery_changes_nothing(
    topic, monkeypatch
) -> None:
    from nats.aio.msg import Msg
    from nats.js.api import AckPolicy, ConsumerConfig

    consumer = _unique("billing")
    _publish(topic, 40, keys=4)
    _relay(NATS_URL)

    async def create(js: Any) -> None:  # short ack wait: a lost ack is redelivered in 1 s
        await js.add_consumer(
            stream_name(topic),
            ConsumerConfig(durable_name=consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=1),
        )

    nats_test._js(create)
    lost = str(OutboxMessage.objects.order_by("seq")[5].message_id)
    acked: list[str] = []
    real_ack = Msg.ack

    async def ack(msg: Msg) -> None:
        message_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        acked.append(message_id)
        if message_id == lost and acked.count(lost) == 1:
            return  # the inbox transaction committed, then the process died: no ack
        await real_ack(msg)

    monkeypatch.setattr(Msg, "ack", ack)
    handler = Recorder()

    with _running(run_nats_consumer, url=NATS_URL, consumer=consumer, topic=topic, handler=handler):
        _wait(
            lambda: acked.count(lost) == 2 and _nats_settled(topic, consumer),
            "the lost ack redelivered and acknowledged",
        )

    assert _inbox(consumer) == 40
    assert len(handler.applied) == 40  # 41 deliveries, 40 effects
    assert len({m.id for m in handler.applied}) == 40
    assert handler.by_key() == {f"k{k}": list(range(k, 40, 4)) for k in range(4)}
    _check_fields(handler.applied[0], topic)


def test_nats_a_failing_handler_is_retried_first_and_key_order_is_kept(topic) -> None:
    consumer = _unique("billing")
    _publish(topic, 10, keys=2)
    _relay(NATS_URL)
    handler = Recorder(fail_once=frozenset({3}))

    began = time.monotonic()
    with _running(
        run_nats_consumer,
        url=NATS_URL,
        consumer=consumer,
        topic=topic,
        handler=handler,
        retry_delay=0.3,
    ):
        _wait(lambda: len(handler.applied) == 10 and _nats_settled(topic, consumer), "10 applied")

    assert _inbox(consumer) == 10
    assert time.monotonic() - began >= 0.3  # redelivered after retry_delay
    assert handler.attempts.count(3) == 2
    assert [m.payload["n"] for m in handler.applied] == list(range(10))  # stream order
    assert handler.by_key() == {"k0": [0, 2, 4, 6, 8], "k1": [1, 3, 5, 7, 9]}


def test_nats_an_unknown_version_goes_to_the_dead_subject(topic, unknown_type) -> None:
    consumer = _unique("billing")
    with transaction.atomic():  # a newer publisher: version 9, which this consumer cannot read
        outbox.publish(topic=topic, key="k", type=unknown_type, payload={"n": 0}, version=9)
        outbox.publish(topic=topic, key="k", type="order.paid", payload={"n": 1})
    _relay(NATS_URL)
    versions.message_type(unknown_type, current=2)  # the consumer's deployment knows 1 and 2
    dead_id = str(OutboxMessage.objects.get(type=unknown_type).message_id)
    handler = Recorder()

    with _running(run_nats_consumer, url=NATS_URL, consumer=consumer, topic=topic, handler=handler):
        _wait(lambda: len(handler.applied) == 1 and _nats_settled(topic, consumer), "1 applied")

    assert _inbox(consumer) == 1
    assert [m.payload["n"] for m in handler.applied] == [1]  # the key goes on after it
    assert not InboxMessage.objects.filter(message_id=dead_id).exists()

    async def last_dead(js: Any) -> Any:
        return await js.get_last_msg(DEAD_JETSTREAM, f"{DEAD_SUBJECT}.{topic}.{unknown_type}")

    dead = nats_test._js(last_dead)
    assert dead.data == b'{"n":0}'
    assert dead.headers["Sagaadmin-Id"] == dead_id
    assert dead.headers["Sagaadmin-Version"] == "9"
    assert dead.headers["Sagaadmin-Key"] == "k"
    assert dead.headers["Sagaadmin-Consumer"] == consumer
    assert "unknown version 9" in dead.headers["Sagaadmin-Error"]


def test_the_runners_raise_when_the_broker_is_away_at_start() -> None:
    from tests.outbox.helpers import dead_port

    stop = threading.Event()
    port = dead_port()
    with pytest.raises(redis.ConnectionError):
        run_redis_consumer(
            f"redis://127.0.0.1:{port}/0",
            consumer="c",
            topic="t",
            handler=Recorder(),
            stop=stop,
        )
    with pytest.raises(OSError):
        run_nats_consumer(
            f"nats://127.0.0.1:{port}", consumer="c", topic="t", handler=Recorder(), stop=stop
        )


# --- all three runners ---------------------------------------------------------------------


@pytest.fixture
def exchange() -> Iterator[str]:
    """A unique RabbitMQ topic (exchange), deleted afterwards."""
    from tests.outbox.test_rabbitmq import _delete_exchange, _reachable

    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    name = f"test.consumer.{uuid.uuid4().hex[:8]}"
    yield name
    asyncio.run(_delete_exchange(name))


def _queue_exists(name: str) -> bool:
    import aio_pika

    async def check() -> bool:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            try:
                await (await connection.channel()).declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return False
            return True

    return asyncio.run(check())


@pytest.mark.parametrize("broker", ["redis", "nats", "rabbitmq"])
def test_a_connection_cut_mid_run_is_waited_out(broker, request) -> None:
    from tests.outbox.tcp_proxy import TcpProxy

    fixture = {"redis": "stream", "nats": "topic", "rabbitmq": "exchange"}[broker]
    name = request.getfixturevalue(fixture)
    consumer = _unique("billing")
    direct, run, port, scheme = {
        "redis": (REDIS_URL, run_redis_consumer, 6379, "redis://127.0.0.1:{}/0"),
        "nats": (NATS_URL, run_nats_consumer, 4222, "nats://127.0.0.1:{}"),
        "rabbitmq": (AMQP_URL, run_rabbitmq_consumer, 5672, "amqp://guest:guest@127.0.0.1:{}/"),
    }[broker]
    proxy = TcpProxy(("127.0.0.1", port))
    handler = Recorder()
    try:
        with _running(
            run,
            url=scheme.format(proxy.port),
            consumer=consumer,
            topic=name,
            handler=handler,
            retry_delay=0.2,
        ):
            if broker == "rabbitmq":  # a message sent before the queue is bound goes nowhere
                _wait(lambda: _queue_exists(consumer), "the queue declared")
                time.sleep(0.3)  # and bound
            _publish(name, 5, keys=1)
            _relay(direct)
            _wait(lambda: len(handler.applied) == 5, "the first 5 applied")
            proxy.cut()
            with transaction.atomic():
                for n in range(5, 10):
                    outbox.publish(topic=name, key="k0", type="order.paid", payload={"n": n})
            _relay(direct)
            time.sleep(1.0)  # the runner cannot read meanwhile
            assert len(handler.applied) == 5
            proxy.restore()  # RabbitMQ: aio-pika reconnects after 5 s
            _wait(lambda: len(handler.applied) == 10, "the next 5 applied after the cut")
    finally:
        proxy.close()
        if broker == "rabbitmq":
            from tests.outbox.test_rabbitmq import _delete_queue

            asyncio.run(_delete_queue(consumer))
    assert _inbox(consumer) == 10
    applied = [m.payload["n"] for m in handler.applied]
    if broker == "rabbitmq":  # its runner does not keep order across a failed attempt (on
        applied.sort()  # SQLite's in-memory test database the relay's writes make some fail)
    assert applied == list(range(10))


@pytest.mark.parametrize("broker", ["redis", "nats"])
def test_stop_finishes_the_message_in_hand_and_the_next_run_applies_the_rest(
    broker, request
) -> None:
    name = request.getfixturevalue("stream" if broker == "redis" else "topic")
    consumer = _unique("billing")
    url, run = {"redis": (REDIS_URL, run_redis_consumer), "nats": (NATS_URL, run_nats_consumer)}[
        broker
    ]
    _publish(name, 5, keys=1)
    _relay(url)
    in_hand = threading.Event()

    def slow(message: Incoming) -> None:
        in_hand.set()
        time.sleep(0.5)  # stop is set meanwhile

    with _running(run, url=url, consumer=consumer, topic=name, handler=slow) as stop:
        assert in_hand.wait(10)
        stop.set()
    assert _inbox(consumer) == 1  # finished (committed) before the runner returned
    if broker == "redis":  # acknowledged; the rest of the batch stays pending for the next run
        assert redis_test._client().xpending(name, consumer)["pending"] == 4
    # NATS: the rest of the batch was naked, so the next run gets it at once (not after the
    # 30 s ack wait: the wait below gives up after 15 s)
    handler = Recorder()
    with _running(run, url=url, consumer=consumer, topic=name, handler=handler):
        _wait(lambda: len(handler.applied) == 4, "the rest applied by the next run")
    assert _inbox(consumer) == 5
    assert [m.payload["n"] for m in handler.applied] == [1, 2, 3, 4]
