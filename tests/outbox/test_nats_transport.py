"""The NATS JetStream transport against the real server: acks, headers, dedupe, streams, away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db import transaction

import outbox
from outbox.models import OutboxMessage
from outbox.relay import RelaySettings
from outbox.transports import transport_from_url
from outbox.transports.jetstream import JetStreamTransport, stream_name
from tests.conftest import need
from tests.outbox.helpers import dead_port, relay_through

NATS_URL = os.environ.get("SAGAADMIN_TEST_NATS_URL", "nats://127.0.0.1:4222")
CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)
pytestmark = pytest.mark.django_db(transaction=True)


def _reachable() -> bool:
    parts = urlsplit(NATS_URL)
    try:
        with socket.create_connection((parts.hostname, parts.port or 4222), timeout=1):
            return True
    except OSError:
        return False


async def _jetstream(action: Any) -> Any:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        return await action(nc.jetstream())
    finally:
        await nc.close()


def _js(action: Any) -> Any:
    """Run ``action(js)`` against the real server on a fresh connection."""
    return asyncio.run(_jetstream(action))


@pytest.fixture
def topic() -> Iterator[str]:
    """A unique topic; every stream it names is deleted afterwards."""
    need(_reachable(), f"needs NATS with JetStream at {NATS_URL}")
    name = f"test.outbox.{uuid.uuid4().hex[:8]}"
    yield name

    async def delete(js: Any) -> None:
        import nats.js.errors

        for stream in (stream_name(name), f"OPERATOR_{stream_name(name)}"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)

    _js(delete)


def _relay(url: str = NATS_URL, *, once: bool = False) -> Any:
    return relay_through(url, CFG, once=once)


def _read(topic: str, n: int, stream: str | None = None) -> list[Any]:
    """The first ``n`` messages of ``<topic>.>`` through a pull consumer, in stream order."""

    async def read(js: Any) -> list[Any]:
        sub = await js.pull_subscribe(
            f"{topic}.>", durable=f"reader-{uuid.uuid4().hex[:6]}", stream=stream
        )
        got: list[Any] = []
        while len(got) < n:
            for message in await sub.fetch(n - len(got), timeout=5):
                await message.ack()
                got.append(message)
        await sub.unsubscribe()
        return got

    return _js(read)


def _count(stream: str) -> int:
    async def count(js: Any) -> int:
        return (await js.stream_info(stream)).state.messages

    return _js(count)


def test_the_relay_publishes_to_jetstream_with_acks_and_headers(topic) -> None:
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
        outbox.publish(topic=topic, key="order-8", type="stock.reserve", payload={"sku": "A"})

    result = _relay()

    assert (result.published, result.retried) == (4, 0)
    stored = list(OutboxMessage.objects.order_by("seq"))
    got = _read(topic, 4)
    assert [m.data for m in got] == [b'{"i":0}', b'{"i":1}', b'{"i":2}', b'{"sku":"A"}']
    assert [m.subject for m in got] == [f"{topic}.payment.charge"] * 3 + [f"{topic}.stock.reserve"]
    assert [m.headers["Nats-Msg-Id"] for m in got] == [str(s.message_id) for s in stored]
    assert [m.headers["Sagaadmin-Key"] for m in got] == ["order-7"] * 3 + ["order-8"]
    assert got[0].headers["Sagaadmin-Version"] == "2"
    assert got[0].headers["traceparent"] == traceparent
    assert got[3].headers["Sagaadmin-Version"] == "1" and "traceparent" not in got[3].headers
    assert {s.status for s in stored} == {"published"}

    async def config(js: Any) -> Any:
        return (await js.stream_info(stream_name(topic))).config

    created = _js(config)
    assert created.name == topic.replace(".", "_")
    assert created.subjects == [f"{topic}.>"]


def test_a_batch_sent_again_after_a_crash_is_deduplicated_by_the_broker(topic) -> None:
    with transaction.atomic():
        for i in range(3):
            outbox.publish(topic=topic, key="k", type="x", payload={"i": i})
    assert _relay().published == 3
    # the relay died after the acks, before its commit: the rows are pending again
    OutboxMessage.objects.update(status="pending", published_at=None)

    assert _relay().published == 3

    assert _count(stream_name(topic)) == 3
    assert [m.data for m in _read(topic, 3)] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']


def test_an_operators_stream_that_captures_the_topic_is_used_as_it_is(topic) -> None:
    operator_stream = f"OPERATOR_{stream_name(topic)}"

    async def create(js: Any) -> None:
        await js.add_stream(name=operator_stream, subjects=[f"{topic}.>"], max_msgs=1000)

    _js(create)
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x", payload={"n": 1})

    assert _relay().published == 1

    assert _count(operator_stream) == 1

    async def streams(js: Any) -> list[str]:
        return [info.config.name for info in await js.streams_info()]

    assert stream_name(topic) not in _js(streams)


def test_a_message_nats_can_never_take_is_permanent_and_holds_its_key_back(topic) -> None:
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="not a subject", payload={"n": 1})
        outbox.publish(topic=topic, key="k", type="x", payload={"n": 2})
        outbox.publish(topic=topic, key="other", type="x", payload={"n": 3})

    result = _relay(once=True)

    assert (result.published, result.dead, result.skipped) == (1, 1, 1)
    poison, held, other = OutboxMessage.objects.order_by("seq")
    assert poison.status == "dead" and poison.attempts == 1
    assert poison.last_error.startswith("Permanent: ") and "not a valid NATS subject" in (
        poison.last_error
    )
    assert (held.status, held.attempts) == ("pending", 0)
    assert other.status == "published"

    assert _relay().published == 1  # the next batch: the key goes on after its dead message
    assert [m.data for m in _read(topic, 2)] == [b'{"n":3}', b'{"n":2}']


def test_with_nats_away_messages_wait_and_go_when_it_returns(topic) -> None:
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x.y", payload={"n": 1})

    result = _relay(f"nats://127.0.0.1:{dead_port()}", once=True)

    assert (result.published, result.retried) == (0, 1)
    message = OutboxMessage.objects.get()
    assert message.status == "pending" and message.attempts == 1
    assert message.last_error.startswith("TransportError: NATS unreachable: ConnectionRefused")

    assert _relay().published == 1
    got = _read(topic, 1)
    assert [(m.subject, m.data) for m in got] == [(f"{topic}.x.y", b'{"n":1}')]
    assert OutboxMessage.objects.get().status == "published"


def test_nats_and_tls_urls_select_the_jetstream_transport() -> None:
    for url in (NATS_URL, "tls://127.0.0.1:4222"):
        transport = transport_from_url(url)
        try:
            assert isinstance(transport, JetStreamTransport)
        finally:
            transport.close()
