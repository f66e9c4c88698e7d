"""Per-key commit order on PostgreSQL: publishers take turns per key; two relays."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

import outbox
from outbox.models import OutboxMessage
from outbox.relay import Relay, RelaySettings
from outbox.transports.base import Outgoing
from outbox.transports.inprocess import InProcessTransport, subscribe
from tests.conftest import need, pg_activity_wait

pytestmark = pytest.mark.django_db(transaction=True)
CFG = RelaySettings(batch_size=20, max_attempts=3, backoff_base=0.0, poll_seconds=0.05)


@pytest.fixture
def received() -> Iterator[list[Outgoing]]:
    vendor = connection.vendor
    need(vendor == "postgresql", f"needs PostgreSQL: DATABASE_URL=postgres://... (on {vendor})")
    got: list[Outgoing] = []
    lock = threading.Lock()

    def handler(message: Outgoing) -> None:
        with lock:
            got.append(message)

    unsubscribe = subscribe("accounts", handler)
    yield got
    unsubscribe()


def test_a_second_publisher_of_a_key_waits_for_the_first_to_commit(received) -> None:
    # given a transaction that published on key a-1 and is still open
    opened, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with transaction.atomic():
            outbox.publish(topic="accounts", key="a-1", type="credited", payload={"n": 1})
            opened.set()
            release.wait(10)
            order.append("first commits")
        connections.close_all()

    def second(key: str, n: int) -> None:
        with transaction.atomic():
            outbox.publish(topic="accounts", key=key, type="credited", payload={"n": n})
            order.append(f"{key} published")
        connections.close_all()

    t1 = threading.Thread(target=first)
    t1.start()
    assert opened.wait(10)
    # when another transaction publishes on the same key, and a third on another key
    t2 = threading.Thread(target=second, args=("a-1", 2))
    t3 = threading.Thread(target=second, args=("b-1", 3))
    t2.start()
    t3.start()
    t3.join(10)
    time.sleep(0.3)
    # then the other key went ahead, the same key waits for the first commit
    assert order == ["b-1 published"]
    assert Relay(InProcessTransport(), CFG).drain().published == 1  # b-1 only
    release.set()
    t1.join(10)
    t2.join(10)
    assert order == ["b-1 published", "first commits", "a-1 published"]
    assert Relay(InProcessTransport(), CFG).drain().published == 2
    assert [m.payload for m in received] == [b'{"n":3}', b'{"n":1}', b'{"n":2}']


def test_eight_unserialised_writers_and_two_relays_keep_each_keys_commit_order(received) -> None:
    """Writers do nothing to serialise themselves; sleeps between publish and commit
    would reorder their commits against their sequence numbers if publish() did not."""
    keys = [f"acct-{i}" for i in range(4)]
    with connection.cursor() as cursor:
        # a row per commit, numbered while the writer still holds the key: commit order
        cursor.execute("CREATE TABLE test_commit (n bigserial, key text, message_id uuid)")
    per_writer = 15
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(per_writer):
                key = rng.choice(keys)
                with transaction.atomic(), connection.cursor() as cursor:
                    if rng.random() < 0.5:  # take a transaction id early
                        cursor.execute("SELECT pg_current_xact_id()")
                    time.sleep(rng.random() * 0.003)
                    message = outbox.publish(topic="accounts", key=key, type="credited", payload={})
                    time.sleep(rng.random() * 0.005)
                    cursor.execute(
                        "INSERT INTO test_commit (key, message_id) VALUES (%s, %s)",
                        [key, message.message_id],
                    )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    stop = threading.Event()

    def relay() -> None:
        try:
            Relay(InProcessTransport(), CFG).run(stop)
        finally:
            connections.close_all()

    relays = [threading.Thread(target=relay) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    try:
        for t in relays + writers:
            t.start()
        for t in writers:
            t.join(60)
        deadline = time.monotonic() + 30
        while (
            OutboxMessage.objects.filter(status="pending").exists() and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in relays:
            t.join(10)
        with connection.cursor() as cursor:
            cursor.execute("SELECT key, message_id FROM test_commit ORDER BY n")
            committed = cursor.fetchall()
            cursor.execute("DROP TABLE test_commit")
    assert not errors, errors
    total = 8 * per_writer
    assert OutboxMessage.objects.filter(status="published").count() == total
    # every message exactly once (two relays, no crash: no duplicates)
    assert len(received) == total
    assert max(Counter(m.id for m in received).values()) == 1
    # and each key's messages in the order their transactions committed
    expected: dict[str, list[str]] = defaultdict(list)
    for key, message_id in committed:
        expected[key].append(str(message_id))
    seen: dict[str, list[str]] = defaultdict(list)
    for m in received:
        seen[m.key].append(str(m.id))
    assert seen == expected


def test_a_claim_that_began_before_another_relay_scheduled_a_retry_holds_the_key_back(
    received,
) -> None:
    """The race between two relays: A claimed key k's head and is about to schedule it
    for a retry; B's claim statement began before A committed (its snapshot shows the
    head as due) and takes k's advisory lock after A committed. B must not send k's next
    message ahead of the head's retry.

    A ``hashtext`` earlier on B's search path sleeps on k's lock key, so A's commit
    lands inside B's claim statement every time."""
    slow = RelaySettings(batch_size=20, max_attempts=5, backoff_base=60, backoff_max=60)
    with transaction.atomic():
        head = outbox.publish(topic="accounts", key="k", type="credited", payload={"n": 1})
    claimed, release, done = threading.Event(), threading.Event(), threading.Event()
    b_got: list[int] = []

    def relay_a() -> None:  # claims the head, then (on cue) schedules its retry and commits
        try:
            relay = Relay(InProcessTransport(), slow)
            with transaction.atomic():
                now = timezone.now()
                rows, _ = relay._claim_rows(now)
                assert [r[1] for r in rows] == [head.message_id]
                claimed.set()
                release.wait(10)
                relay._mark([rows[0][0]], [ConnectionError("broker hiccup")], now)
        finally:
            done.set()
            connections.close_all()

    def relay_b() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL search_path = test_hook, pg_catalog, public")
                b_got.append(Relay(InProcessTransport(), slow).run_once().published)
        finally:
            connections.close_all()

    with connection.cursor() as cursor:
        cursor.execute("CREATE SCHEMA test_hook")
    a = threading.Thread(target=relay_a)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE FUNCTION test_hook.hashtext(t text) RETURNS integer LANGUAGE plpgsql"
                " AS $$ BEGIN IF t = 'accounts/k' THEN PERFORM pg_sleep(0.5); END IF;"
                " RETURN pg_catalog.hashtext(t); END $$"
            )
        a.start()
        assert claimed.wait(10)
        with transaction.atomic():  # k's next message, committed after A's claim
            outbox.publish(topic="accounts", key="k", type="credited", payload={"n": 2})
        b = threading.Thread(target=relay_b)
        b.start()
        # B's statement has its snapshot and sleeps in test_hook.hashtext, on k's lock key
        assert pg_activity_wait("wait_event = 'PgSleep' AND pid <> pg_backend_pid()"), (
            "the second relay's claim never reached the sleeping hashtext"
        )
        release.set()
        assert done.wait(10)
        b.join(10)
        a.join(10)
    finally:
        release.set()
        with connection.cursor() as cursor:
            cursor.execute("DROP SCHEMA test_hook CASCADE")
    assert b_got == [0]
    assert received == []  # nothing of k went out while its head waits for the retry
    rows = OutboxMessage.objects.order_by("seq").values_list("payload", "status", "attempts")
    assert list(rows) == [('{"n":1}', "pending", 1), ('{"n":2}', "pending", 0)]
