"""Fault tests on the real PostgreSQL and RabbitMQ: a relay killed mid-batch, the inbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.db import connection, connections, transaction

import outbox
from outbox.consumers import run_rabbitmq_consumer
from outbox.inbox import Incoming
from outbox.models import InboxMessage, OutboxMessage
from tests.conftest import need
from tests.outbox.test_rabbitmq import AMQP_URL, _delete_exchange, _delete_queue, _reachable

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]


def _relay_env(tmp_path: Path) -> dict[str, str]:
    from tests.e2e.conftest import _database_url

    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
        "DATABASE_URL": _database_url(dict(connection.settings_dict)),
        "BROKER_URL": AMQP_URL,
        "OUTBOX_BATCH_SIZE": "100",
        "OUTBOX_POLL_SECONDS": "0.2",
        "SAGAADMIN_VAR_DIR": str(tmp_path),
    }


def test_a_relay_killed_mid_batch_loses_nothing_and_the_inbox_applies_once(tmp_path) -> None:
    need(connection.vendor == "postgresql", "needs PostgreSQL (relay in a subprocess)")
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    topic = f"test.faults.{uuid.uuid4().hex[:8]}"
    consumer = f"test-consumer-{uuid.uuid4().hex[:8]}"
    total = 2000
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE test_effect (message_id text, n int)")
    deliveries: list[str] = []

    def apply(message: Incoming) -> None:  # the consumer's own write, in the inbox transaction
        deliveries.append(message.id)
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO test_effect VALUES (%s, %s)", [message.id, message.payload["n"]]
            )

    stop = threading.Event()
    consuming = threading.Thread(
        target=run_rabbitmq_consumer,
        kwargs={
            "url": AMQP_URL,
            "consumer": consumer,
            "topic": topic,
            "handler": apply,
            "stop": stop,
            "prefetch": 200,
        },
    )
    consuming.start()
    try:
        time.sleep(1.0)  # the queue is declared and bound
        with transaction.atomic():
            for n in range(total):
                outbox.publish(topic=topic, key=f"k{n % 50}", type="fault.test", payload={"n": n})
        env = _relay_env(tmp_path)
        relay = subprocess.Popen([sys.executable, "manage.py", "run_relay"], cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline
            and not OutboxMessage.objects.filter(status="published").exists()
        ):
            time.sleep(0.005)
        relay.send_signal(signal.SIGKILL)  # a batch committed, the next one in flight
        relay.wait(10)
        published_before = OutboxMessage.objects.filter(status="published").count()
        assert published_before < total, "the relay finished before it was killed"
        again = subprocess.run(
            [sys.executable, "manage.py", "run_relay", "--once"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stderr
        deadline = time.monotonic() + 180
        while (applied := InboxMessage.objects.filter(consumer=consumer).count()) < total:
            assert time.monotonic() < deadline, f"the consumer applied {applied} of {total}"
            time.sleep(0.1)
    finally:
        stop.set()
        consuming.join(15)
        connections.close_all()
    assert OutboxMessage.objects.filter(status="published").count() == total
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), count(DISTINCT message_id) FROM test_effect")
        effects, distinct = cursor.fetchone()
        cursor.execute("DROP TABLE test_effect")
    # every message at least once over the wire, exactly once in effect
    assert len(set(deliveries)) == total
    assert (effects, distinct) == (total, total)
    import asyncio

    asyncio.run(_delete_exchange(topic))
    asyncio.run(_delete_queue(consumer))


# Each batch tries to connect while the broker is away: a connection that failed to open
# must be closed, not left to aio-pika's __del__ ("coroutine ... never awaited").
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_with_the_broker_cut_off_writers_go_on_and_the_backlog_drains_after(tmp_path) -> None:
    need(connection.vendor == "postgresql", "needs PostgreSQL (LISTEN/NOTIFY, SKIP LOCKED)")
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    import asyncio
    import tracemalloc

    from outbox.relay import Relay, RelaySettings
    from outbox.transports import transport_from_url
    from tests.outbox.tcp_proxy import TcpProxy
    from tests.outbox.test_rabbitmq import _bound_queue, _take

    topic = f"test.cut.{uuid.uuid4().hex[:8]}"
    proxy = TcpProxy(("127.0.0.1", 5672))
    transport = transport_from_url(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    cfg = RelaySettings(
        batch_size=200, max_attempts=1000, backoff_base=0.05, backoff_max=0.2, poll_seconds=0.1
    )
    stop = threading.Event()

    def relay() -> None:
        try:
            Relay(transport, cfg).run(stop)
        finally:
            connections.close_all()

    def write(first: int, n: int) -> None:
        for i in range(first, first + n):
            with transaction.atomic():
                outbox.publish(topic=topic, key=f"k{i % 7}", type="cut.test", payload={"n": i})

    async def scenario() -> list[int]:
        conn, _, queue = await _bound_queue(topic)
        async with conn:
            running = threading.Thread(target=relay)
            running.start()
            try:
                await asyncio.to_thread(write, 0, 100)
                got = await _take(queue, 100)
                proxy.cut()
                tracemalloc.start()
                began = time.monotonic()
                await asyncio.to_thread(write, 100, 400)  # writers do not notice
                wrote_in = time.monotonic() - began
                await asyncio.sleep(2)  # the relay keeps failing meanwhile
                pending = await asyncio.to_thread(_pending_count)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                proxy.restore()
                got += await _take(queue, 400)
            finally:
                stop.set()
                await asyncio.to_thread(running.join, 15)
        assert wrote_in < 30
        assert pending == 400  # the backlog grew, nothing was lost or sent
        assert peak < 50 * 1024 * 1024  # bounded: batches, not the backlog, in memory
        return [int(m.body.decode().split(":")[1].rstrip("}")) for m in got]

    try:
        seen = asyncio.run(scenario())
    finally:
        transport.close()
        proxy.close()
        connections.close_all()
    assert sorted(set(seen)) == list(range(500))  # everything, after the broker returned
    for k in range(7):  # each key in order (first deliveries; a redelivery may repeat one)
        firsts = list(dict.fromkeys(n for n in seen if n % 7 == k))
        assert firsts == sorted(firsts), (k, firsts)
    assert OutboxMessage.objects.filter(status="published").count() == 500
    asyncio.run(_delete_exchange(topic))


def _pending_count() -> int:
    try:
        return OutboxMessage.objects.filter(status="pending").count()
    finally:
        connections.close_all()
