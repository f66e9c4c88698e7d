"""Message versions: chained upcasters, unknown versions, the relay's dead letter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

import outbox
from outbox import versions
from outbox.inbox import incoming
from outbox.models import OutboxMessage
from outbox.relay import Relay, RelaySettings
from outbox.transports.base import Outgoing
from outbox.transports.inprocess import InProcessTransport, subscribe


@pytest.fixture
def shipped() -> Iterator[str]:
    """A message type at version 3: v1 had 'addr', v2 'address', v3 an address object."""
    name = "test.order.shipped"
    versions.message_type(name, current=1)

    @versions.upcaster(name, 1)
    def v1_to_v2(p: dict[str, Any]) -> dict[str, Any]:
        out = dict(p)
        out["address"] = out.pop("addr")
        return out

    @versions.upcaster(name, 2)
    def v2_to_v3(p: dict[str, Any]) -> dict[str, Any]:
        out = dict(p)
        out["address"] = {"line": out["address"], "country": "??"}
        return out

    yield name
    versions._registry.pop(name)


def test_upcasters_chain_to_the_current_version(shipped) -> None:
    assert versions.registered(shipped).supported() == (1, 2, 3)  # type: ignore[union-attr]
    assert versions.upcast(shipped, 1, {"id": 7, "addr": "Main St"}) == (
        3,
        {"id": 7, "address": {"line": "Main St", "country": "??"}},
    )
    current = {"id": 7, "address": {"line": "x", "country": "NL"}}
    assert versions.upcast(shipped, 3, current) == (3, current)


def test_an_unknown_version_is_a_clear_error(shipped) -> None:
    with pytest.raises(versions.UnknownVersion, match=r"unknown version 4; supported: 1, 2, 3"):
        versions.upcast(shipped, 4, {})
    assert versions.upcast("test.unregistered", 9, {"a": 1}) == (9, {"a": 1})


def test_a_chain_with_a_hole_supports_only_what_reaches_current() -> None:
    name = "test.holey"
    versions.message_type(name, current=3)
    versions.upcaster(name, 2)(lambda p: p)
    try:
        assert versions.registered(name).supported() == (2, 3)  # type: ignore[union-attr]
        with pytest.raises(versions.UnknownVersion):
            versions.upcast(name, 1, {})
    finally:
        versions._registry.pop(name)


def test_a_consumer_sees_a_v1_message_in_the_v3_shape(transactional_db, shipped) -> None:
    got: list[Outgoing] = []
    unsubscribe = subscribe("shipping", got.append)
    try:
        with transaction.atomic():  # published by code that still speaks v1
            outbox.publish(
                topic="shipping",
                key="o-1",
                type=shipped,
                version=1,
                payload={"id": 1, "addr": "Main St"},
            )
        Relay(InProcessTransport(), RelaySettings(backoff_base=0)).drain()
    finally:
        unsubscribe()
    (message,) = got
    assert message.version == 1  # sent as stored ...
    seen = incoming(
        id=str(message.id),
        topic=message.topic,
        key=message.key,
        type=message.type,
        version=message.version,
        payload=json.loads(message.payload),
    )
    assert (seen.version, seen.payload) == (
        3,
        {"id": 1, "address": {"line": "Main St", "country": "??"}},
    )


def test_the_relay_sends_an_unknown_version_to_dead_not_to_the_broker(
    transactional_db, shipped
) -> None:
    got: list[Outgoing] = []
    unsubscribe = subscribe("shipping", got.append)
    try:
        with transaction.atomic():
            outbox.publish(topic="shipping", key="o-1", type=shipped, version=7, payload={})
            outbox.publish(
                topic="shipping",
                key="o-2",
                type=shipped,
                version=3,
                payload={"id": 2, "address": {"line": "y", "country": "NL"}},
            )
        result = Relay(InProcessTransport(), RelaySettings(backoff_base=0)).drain()
    finally:
        unsubscribe()
    assert (result.published, result.dead) == (1, 1)
    assert [m.key for m in got] == ["o-2"]
    dead = OutboxMessage.objects.get(aggregateid="o-1")
    assert dead.status == "dead" and dead.attempts == 1
    assert "unknown version 7; supported: 1, 2, 3" in dead.last_error
