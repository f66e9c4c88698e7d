"""The RabbitMQ transport against the real broker: confirms, headers, broker away."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections, transaction

import outbox
from outbox.models import OutboxMessage
from outbox.relay import Relay, RelaySettings
from outbox.transports import transport_from_url
from tests.conftest import need

AMQP_URL = os.environ.get("SAGAADMIN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)
pytestmark = pytest.mark.django_db(transaction=True)


def _drain(transport: Any) -> Any:
    """Relay.drain in a worker thread, closing that thread's database connection."""
    try:
        return Relay(transport, CFG).drain()
    finally:
        connections.close_all()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def topic() -> Iterator[str]:
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    name = f"test.outbox.{uuid.uuid4().hex[:8]}"
    yield name
    asyncio.run(_delete_exchange(name))


async def _delete_exchange(name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)


async def _bound_queue(topic: str) -> tuple[Any, Any, Any]:
    """An exclusive queue bound to every routing key of the topic's exchange."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(topic, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    return connection, channel, queue


async def _take(queue: Any, n: int) -> list[Any]:
    got = []
    async with queue.iterator(timeout=10) as messages:
        async for message in messages:
            await message.ack()
            got.append(message)
            if len(got) == n:
                break
    return got


def test_the_relay_publishes_to_rabbitmq_with_confirms_and_headers(topic) -> None:
    async def scenario() -> list[Any]:
        connection, _, queue = await _bound_queue(topic)
        async with connection:
            transport = transport_from_url(AMQP_URL)
            try:
                result = await asyncio.to_thread(_drain, transport)
            finally:
                transport.close()
            assert result.published == 3
            return await _take(queue, 3)

    with transaction.atomic():
        for i in range(3):
            outbox.publish(
                topic=topic,
                key="order-7",
                type="payment.charge",
                payload={"i": i},
                version=2,
                headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
            )
    got = asyncio.run(scenario())
    stored = list(OutboxMessage.objects.order_by("seq"))
    assert [m.body for m in got] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
    assert [m.message_id for m in got] == [str(s.message_id) for s in stored]
    first = got[0]
    assert first.routing_key == "payment.charge" and first.type == "payment.charge"
    assert first.delivery_mode == 2  # persistent
    assert first.headers["sagaadmin-key"] == "order-7"
    assert first.headers["sagaadmin-version"] == 2
    assert first.headers["traceparent"].startswith("00-aaaa")
    assert {s.status for s in stored} == {"published"}


def test_with_the_broker_away_messages_wait_and_go_when_it_returns(topic) -> None:
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x.y", payload={"n": 1})
    # a port nobody listens on: the publish fails, the message stays pending
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    away = transport_from_url(f"amqp://guest:guest@127.0.0.1:{dead_port}/")
    try:
        result = Relay(away, CFG).drain()
    finally:
        away.close()
    assert (result.published, result.retried) == (0, 1)
    message = OutboxMessage.objects.get()
    assert message.status == "pending" and message.attempts == 1
    assert "unreachable" in message.last_error

    async def scenario() -> list[Any]:
        connection, _, queue = await _bound_queue(topic)
        async with connection:
            transport = transport_from_url(AMQP_URL)
            try:
                assert (await asyncio.to_thread(_drain, transport)).published == 1
            finally:
                transport.close()
            return await _take(queue, 1)

    assert [m.body for m in asyncio.run(scenario())] == [b'{"n":1}']


def test_an_unknown_broker_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="BROKER_URL: unsupported scheme 'kafka'"):
        transport_from_url("kafka://localhost")


def test_run_relay_wakes_on_notify_and_stops_cleanly_on_sigterm(topic, tmp_path) -> None:
    """The command as production runs it: a process on PostgreSQL, publishing to RabbitMQ."""
    from django.db import connection

    from tests.e2e.conftest import _database_url

    need(connection.vendor == "postgresql", "run_relay's LISTEN/NOTIFY needs PostgreSQL")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
        "DATABASE_URL": _database_url(dict(connection.settings_dict)),
        "BROKER_URL": AMQP_URL,
        "OUTBOX_POLL_SECONDS": "30",  # only a NOTIFY can wake it within the test
        "SAGAADMIN_VAR_DIR": str(tmp_path),
    }
    log = tmp_path / "relay.log"

    async def scenario() -> list[Any]:
        connection_, _, queue = await _bound_queue(topic)
        async with connection_:
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "manage.py", "run_relay"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                await _until(lambda: b"relay: publishing" in log.read_bytes())
                await asyncio.sleep(0.5)  # it is LISTENing now
                await asyncio.to_thread(_publish_one, topic)
                got = await _take(queue, 1)
            finally:
                process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(process.wait, 15)
            assert code == 0, log.read_text()
            return got

    got = asyncio.run(scenario())
    assert [m.body for m in got] == [b'{"hello":"relay"}']
    assert b"relay: stopped" in log.read_bytes()
    assert OutboxMessage.objects.get().status == "published"


def _publish_one(topic: str) -> None:
    try:
        with transaction.atomic():
            outbox.publish(topic=topic, key="k", type="hello", payload={"hello": "relay"})
    finally:
        connections.close_all()


async def _until(condition: Any, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.1)


def test_the_consumer_retries_a_failed_message_before_the_later_ones(topic) -> None:
    import threading

    from outbox.consumers import run_rabbitmq_consumer
    from outbox.inbox import Incoming

    consumer = f"test-order-{uuid.uuid4().hex[:8]}"
    applied: list[int] = []
    failed: list[int] = []

    def handler(message: Incoming) -> None:
        n = message.payload["n"]
        if n == 1 and not failed:
            failed.append(n)
            raise RuntimeError("downstream hiccup")
        applied.append(n)

    stop = threading.Event()
    runner = threading.Thread(
        target=run_rabbitmq_consumer,
        kwargs={
            "url": AMQP_URL,
            "consumer": consumer,
            "topic": topic,
            "handler": handler,
            "stop": stop,
            "retry_delay": 0.2,
        },
    )
    runner.start()
    try:
        time.sleep(1.0)  # the queue is declared and bound
        with transaction.atomic():
            for n in range(5):
                outbox.publish(topic=topic, key="k", type="x.y", payload={"n": n})
        transport = transport_from_url(AMQP_URL)
        try:
            assert _drain(transport).published == 5
        finally:
            transport.close()
        deadline = time.monotonic() + 20
        while len(applied) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(15)
        connections.close_all()
        asyncio.run(_delete_queue(consumer))
    assert failed == [1]
    assert applied == [0, 1, 2, 3, 4]  # the retry came before 2, 3, 4


async def _delete_queue(name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


def test_two_claim_loops_share_the_connection_and_keep_each_keys_order(topic) -> None:
    """run() with two claim loops (PostgreSQL, RabbitMQ): both claim, every message
    arrives once, and each key's messages in order."""
    need(connection.vendor == "postgresql", "two claim loops need PostgreSQL")
    n, keys = 400, 50
    with transaction.atomic():
        for i in range(n):
            outbox.publish(topic=topic, key=f"k{i % keys}", type="loop.test", payload={"i": i})
    claimers: set[str] = set()  # the loops (threads) that claimed

    class Recording(Relay):
        def run_once(self) -> Any:
            claimers.add(threading.current_thread().name)
            return super().run_once()

    cfg = RelaySettings(batch_size=20, loops=2, poll_seconds=0.05, backoff_base=0.0)
    transport = transport_from_url(AMQP_URL)
    relay = Recording(transport, cfg)
    assert relay.loops() == 2

    def run(stop: threading.Event) -> None:
        try:
            relay.run(stop)
        finally:
            connections.close_all()

    async def scenario() -> list[Any]:
        amqp, _, queue = await _bound_queue(topic)
        async with amqp:
            stop = threading.Event()
            thread = threading.Thread(target=run, args=(stop,), name="relay-0")
            thread.start()
            try:
                return await _take(queue, n)
            finally:
                stop.set()
                await asyncio.to_thread(thread.join, 10)
                transport.close()

    got = asyncio.run(scenario())
    assert claimers == {"relay-0", "relay-1"}
    assert len({m.message_id for m in got}) == n
    seen: dict[str, list[int]] = {}
    for message in got:
        seen.setdefault(message.headers["sagaadmin-key"], []).append(json.loads(message.body)["i"])
    assert all(values == sorted(values) for values in seen.values())
    assert sum(len(v) for v in seen.values()) == n
    assert OutboxMessage.objects.filter(status="published").count() == n


def test_a_batch_drops_only_the_connection_it_used() -> None:
    """After a failed batch the transport drops the connection that batch used, but not
    one another batch opened since (two relay loops share the transport)."""
    from outbox.transports.rabbitmq import RabbitMQTransport

    class Connection:
        is_closed = False

        async def close(self) -> None:
            self.is_closed = True

    transport = RabbitMQTransport(AMQP_URL)
    try:
        old, current = Connection(), Connection()
        transport._connection = current  # type: ignore[assignment]
        transport._background.run(transport._reset(old), 5)  # type: ignore[arg-type]
        assert transport._connection is current and not current.is_closed
        transport._background.run(transport._reset(current), 5)  # type: ignore[arg-type]
        assert transport._connection is None and current.is_closed
    finally:
        transport.close()
