"""The Redis Streams transport against the real server: entries, order, refusals, server away."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.db import transaction

import outbox
from outbox.models import OutboxMessage
from outbox.relay import RelaySettings
from outbox.transports import transport_from_url
from outbox.transports.redis_streams import RedisStreamsTransport
from tests.conftest import need
from tests.outbox.helpers import dead_port, relay_through

REDIS_URL = os.environ.get("SAGAADMIN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)
pytestmark = pytest.mark.django_db(transaction=True)


def _client() -> Any:
    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)


def _reachable() -> bool:
    try:
        return bool(_client().ping())
    except redis.RedisError:
        return False


@pytest.fixture
def streams() -> Iterator[list[str]]:
    """Unique stream names for one test; deleted afterwards."""
    need(_reachable(), f"needs Redis at {REDIS_URL}")
    names = [f"test.outbox.{uuid.uuid4().hex[:8]}" for _ in range(2)]
    yield names
    _client().delete(*names)


def _relay(url: str = REDIS_URL, *, once: bool = False) -> Any:
    return relay_through(url, CFG, once=once)


def _entries(stream: str) -> list[dict[str, bytes]]:
    return [{k.decode(): v for k, v in fields.items()} for _, fields in _client().xrange(stream)]


def test_the_relay_appends_each_message_to_the_topics_stream_in_order(streams) -> None:
    topic, other = streams
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    with transaction.atomic():
        for i in range(3):
            outbox.publish(
                topic=topic,
                key="order-7",
                type="payment.charge",
                payload={"i": i},
                version=2,
                headers={"traceparent": traceparent},
            )
        outbox.publish(topic=other, key="order-8", type="stock.reserve", payload={"sku": "A"})

    result = _relay()

    assert (result.published, result.retried) == (4, 0)
    stored = list(OutboxMessage.objects.order_by("seq"))
    got = _entries(topic)
    assert [e["payload"] for e in got] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
    assert [e["id"].decode() for e in got] == [str(s.message_id) for s in stored[:3]]
    assert {e["key"] for e in got} == {b"order-7"}
    assert {e["type"] for e in got} == {b"payment.charge"}
    assert {e["version"] for e in got} == {b"2"}
    assert json.loads(got[0]["headers"]) == {"traceparent": traceparent}
    assert sorted(got[0]) == ["headers", "id", "key", "payload", "type", "version"]
    assert _entries(other) == [
        {
            "id": str(stored[3].message_id).encode(),
            "key": b"order-8",
            "type": b"stock.reserve",
            "version": b"1",
            "payload": b'{"sku":"A"}',
            "headers": b"{}",
        }
    ]
    assert {s.status for s in stored} == {"published"}


def test_a_refused_xadd_fails_only_its_own_message(streams) -> None:
    topic, not_a_stream = streams
    _client().set(not_a_stream, "a plain string, not a stream")
    with transaction.atomic():
        outbox.publish(topic=not_a_stream, key="k1", type="x", payload={"n": 1})
        outbox.publish(topic=topic, key="k2", type="x", payload={"n": 2})

    result = _relay(once=True)

    assert (result.published, result.retried) == (1, 1)
    refused = OutboxMessage.objects.get(aggregatetype=not_a_stream)
    assert refused.status == "pending" and refused.attempts == 1
    assert "WRONGTYPE" in refused.last_error and not_a_stream in refused.last_error
    assert OutboxMessage.objects.get(aggregatetype=topic).status == "published"
    assert [e["payload"] for e in _entries(topic)] == [b'{"n":2}']


def test_with_redis_away_messages_wait_and_go_when_it_returns(streams) -> None:
    topic = streams[0]
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x.y", payload={"n": 1})

    result = _relay(f"redis://127.0.0.1:{dead_port()}/0", once=True)

    assert (result.published, result.retried) == (0, 1)
    message = OutboxMessage.objects.get()
    assert message.status == "pending" and message.attempts == 1
    assert message.last_error.startswith("TransportError: Redis unreachable")
    assert _entries(topic) == []

    assert _relay().published == 1
    assert [e["payload"] for e in _entries(topic)] == [b'{"n":1}']
    assert OutboxMessage.objects.get().status == "published"


def test_redis_and_rediss_urls_select_the_streams_transport() -> None:
    for url in (REDIS_URL, "rediss://127.0.0.1:6380/0"):
        transport = transport_from_url(url)
        try:
            assert isinstance(transport, RedisStreamsTransport)
        finally:
            transport.close()
