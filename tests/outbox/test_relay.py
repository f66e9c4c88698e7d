"""The relay on the in-process transport: publish after commit, retry, dead, per-key order.

Real commits (``transactional_db``): on PostgreSQL the relay claims only rows
of transactions older than every running one, its test's own included.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

import outbox
from outbox.models import OutboxMessage
from outbox.relay import _CLAIM_POSTGRES, _RELAY_LOCK_SPACE, Relay, RelaySettings, backoff
from outbox.transports.base import Outgoing
from outbox.transports.inprocess import InProcessTransport, subscribe
from tests.conftest import need

FAST = RelaySettings(batch_size=50, max_attempts=3, backoff_base=0.0, backoff_max=0.0)


@pytest.fixture
def received() -> Iterator[list[Outgoing]]:
    got: list[Outgoing] = []
    unsubscribe = subscribe("orders", got.append)
    yield got
    unsubscribe()


def publish_many(n: int, *, key: str = "order-1", topic: str = "orders") -> None:
    with transaction.atomic():
        for i in range(n):
            outbox.publish(topic=topic, key=key, type="order.updated", payload={"n": i})


def test_committed_messages_are_delivered_once_and_marked(transactional_db, received) -> None:
    publish_many(3)
    result = Relay(InProcessTransport(), FAST).drain()
    assert result.published == 3
    assert [m.payload for m in received] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert {m.type for m in received} == {"order.updated"}
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {"published"}
    assert OutboxMessage.objects.filter(published_at__isnull=True).count() == 0
    assert Relay(InProcessTransport(), FAST).drain().published == 0  # nothing twice


def test_a_message_not_yet_available_waits(transactional_db, received) -> None:
    with transaction.atomic():
        outbox.publish(
            topic="orders",
            key="k",
            type="x",
            payload={},
            available_at=timezone.now() + timedelta(hours=1),
        )
    assert Relay(InProcessTransport(), FAST).drain().claimed == 0
    assert received == []


def test_a_poison_message_goes_dead_and_the_others_keep_flowing(transactional_db) -> None:
    got: list[bytes] = []

    def handler(message: Outgoing) -> None:
        if message.key == "poison":
            raise ValueError("cannot handle this one")
        got.append(message.payload)

    unsubscribe = subscribe("orders", handler)
    try:
        publish_many(1, key="poison")
        publish_many(2, key="fine")
        relay = Relay(InProcessTransport(), FAST)
        for _ in range(FAST.max_attempts):
            relay.drain()
    finally:
        unsubscribe()
    assert got == [b'{"n":0}', b'{"n":1}']
    dead = OutboxMessage.objects.get(aggregateid="poison")
    assert dead.status == "dead"
    assert dead.attempts == FAST.max_attempts
    assert dead.last_error == "ValueError: cannot handle this one"


def test_a_failed_message_holds_back_the_later_ones_of_its_key(transactional_db) -> None:
    got: list[bytes] = []
    fail = {"on": True}

    def handler(message: Outgoing) -> None:
        if message.payload == b'{"n":0}' and fail["on"]:
            raise ConnectionError("broker hiccup")
        got.append(message.payload)

    unsubscribe = subscribe("orders", handler)
    try:
        publish_many(3)
        slow = RelaySettings(batch_size=50, max_attempts=5, backoff_base=60, backoff_max=60)
        relay = Relay(InProcessTransport(), slow)
        first = relay.drain()
        assert (first.retried, first.skipped, first.published) == (1, 2, 0)
        assert relay.drain().claimed == 0  # the head waits for its retry; the rest wait too
        fail["on"] = False
        OutboxMessage.objects.update(available_at=timezone.now())  # the retry is due
        assert relay.drain().published == 3
    finally:
        unsubscribe()
    assert got == [b'{"n":0}', b'{"n":1}', b'{"n":2}']  # order kept across the retry
    head = OutboxMessage.objects.order_by("seq").first()
    assert head is not None and head.attempts == 1 and head.last_error == ""


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    cfg = RelaySettings(backoff_base=1.0, backoff_max=30.0)
    for attempts, step in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (9, 30.0)]:
        waits = {backoff(attempts, cfg).total_seconds() for _ in range(50)}
        assert all(step / 2 <= w <= step for w in waits), (attempts, waits)
        assert len(waits) > 1  # jittered


def test_claim_loops_run_side_by_side_only_where_that_is_safe(transactional_db) -> None:
    """Several loops need PostgreSQL (SQLite: one writer) and a transport that publishes
    from two threads at once; the in-process transport does not declare that."""

    class Concurrent(InProcessTransport):
        concurrent_publish = True

    cfg = RelaySettings(loops=3)
    assert Relay(InProcessTransport(), cfg).loops() == 1
    on_postgres = connection.vendor == "postgresql"
    assert Relay(Concurrent(), cfg).loops() == (3 if on_postgres else 1)
    assert Relay(Concurrent(), RelaySettings(loops=0)).loops() == 1


def test_a_failed_claim_loop_stops_the_others_and_its_error_is_raised(transactional_db) -> None:
    """With two loops, an error one loop cannot handle (here the transport's) ends run()
    with that error, as with one loop, instead of leaving the other loop running."""
    need(connection.vendor == "postgresql", "two claim loops need PostgreSQL")

    class Broken(InProcessTransport):  # breaks once: the other loop could go on
        concurrent_publish = True
        broke = False

        def publish(self, messages: Any) -> Any:
            if not Broken.broke:
                Broken.broke = True
                raise RuntimeError("the transport broke")
            return super().publish(messages)

    publish_many(1)
    stop = threading.Event()
    raised: list[BaseException] = []

    def run() -> None:
        try:
            Relay(Broken(), RelaySettings(loops=2, poll_seconds=0.05)).run(stop)
        except BaseException as exc:
            raised.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    stopped = not thread.is_alive()
    stop.set()
    thread.join(10)
    assert stopped, "run() went on after a loop failed"
    assert [str(e) for e in raised] == ["the transport broke"]


def test_the_claim_skips_dead_index_entries_without_a_bitmap_scan(transactional_db) -> None:
    need(connection.vendor == "postgresql", "the claim's plan is PostgreSQL's")
    # given a pending index full of dead entries (published rows, not vacuumed yet),
    # no statistics yet (a new or truncated table: the planner then prefers a bitmap
    # scan), and a few new messages
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO outbox_outboxmessage (id, aggregatetype, aggregateid, type, version, "
            "payload, headers, created_at, available_at, attempts, last_error, status) "
            "SELECT gen_random_uuid(), 'orders', 'busy-' || (i % 1000), 'order.updated', 1, "
            "'{}', '{}', now(), now(), 0, '', 'pending' FROM generate_series(1, 150000) i"
        )
        cursor.execute("UPDATE outbox_outboxmessage SET status = 'published', published_at = now()")
    publish_many(5, key="fresh")
    # when the relay claims (its statements, in its transaction)
    relay = Relay(InProcessTransport(), FAST)
    with transaction.atomic():
        rows, _ = relay._claim_rows(timezone.now())
        with connection.cursor() as cursor:
            cursor.execute(
                "EXPLAIN " + _CLAIM_POSTGRES,
                {"now": timezone.now(), "limit": 50, "lock_space": _RELAY_LOCK_SPACE},
            )
            plan = "\n".join(row[0] for row in cursor.fetchall())
    # then it found them with a plain index scan, which marks dead entries once and
    # skips them after (a bitmap scan visits the heap for each, on every claim)
    assert len(rows) == 5
    assert "Index Scan" in plan and "Bitmap" not in plan, plan
    # and the setting ended with the claim's transaction (pooled connections are shared)
    with connection.cursor() as cursor:
        cursor.execute("SHOW enable_bitmapscan")
        assert cursor.fetchone()[0] == "on"
