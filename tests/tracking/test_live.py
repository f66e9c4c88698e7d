"""Live updates: websocket consumer, deltas after commit, versions (Channels)."""

from __future__ import annotations

import asyncio
import os

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser

from tests.conftest import need, role_group
from tracking.consumers import SagaLiveConsumer
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create

pytestmark = pytest.mark.django_db(transaction=True)


def _viewer():  # type: ignore[no-untyped-def]
    user = get_user_model().objects.create_user("watcher", password="pw-watch-123")
    user.groups.add(role_group("viewer"))
    return user


def _ingest(saga_id: str, event_id: str, type_: str = "saga.started") -> None:
    raw = (
        f'{{"id": "{event_id}", "saga_id": "{saga_id}", "type": "{type_}", '
        f'"saga_type": "order", "occurred_at": "2026-11-26T10:00:00Z"}}'
    ).encode()
    from django.db import transaction

    with transaction.atomic():
        events_ingest(service=service_get_or_create(name="payment"), raws=[raw])


async def _connect(user):  # type: ignore[no-untyped-def]
    communicator = WebsocketCommunicator(SagaLiveConsumer.as_asgi(), "/ws/sagas")
    communicator.scope["user"] = user
    connected, code = await communicator.connect()
    return communicator, connected, code


def test_anonymous_and_roleless_users_are_refused() -> None:
    async def main() -> None:
        _, connected, code = await _connect(AnonymousUser())
        assert not connected and code == 4403
        roleless = await sync_to_async(get_user_model().objects.create_user)("nobody", password="x")
        _, connected, code = await _connect(roleless)
        assert not connected and code == 4403

    asyncio.run(main())


def test_a_viewer_gets_versioned_deltas_after_commit() -> None:
    async def main() -> None:
        communicator, connected, _ = await _connect(await sync_to_async(_viewer)())
        assert connected
        await sync_to_async(_ingest)("live-1", "e1")
        first = await communicator.receive_json_from(timeout=2)
        assert first == {"type": "sagas.changed", "deltas": [{"saga_id": "live-1", "version": 1}]}
        await sync_to_async(_ingest)("live-1", "e2", "saga.completed")
        second = await communicator.receive_json_from(timeout=2)
        assert second["deltas"] == [{"saga_id": "live-1", "version": 2}]
        # a duplicate changes nothing, so nothing is pushed
        await sync_to_async(_ingest)("live-1", "e2", "saga.completed")
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()

    asyncio.run(main())


def test_nothing_is_pushed_for_a_rolled_back_transaction() -> None:
    from django.db import transaction

    async def main() -> None:
        communicator, _, _ = await _connect(await sync_to_async(_viewer)())

        def ingest_then_fail() -> None:
            with pytest.raises(RuntimeError), transaction.atomic():
                _ingest("live-2", "e1")
                raise RuntimeError("rolled back")

        await sync_to_async(ingest_then_fail)()
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()

    asyncio.run(main())


def test_deltas_cross_processes_through_redis(settings) -> None:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
        reachable = True
    except redis.exceptions.ConnectionError:
        reachable = False
    need(reachable, f"needs Redis at {redis_url}")
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [redis_url], "prefix": "sagaadmin-test"},
        }
    }
    channel_layers.backends.clear()
    try:

        async def main() -> None:
            communicator, connected, _ = await _connect(await sync_to_async(_viewer)())
            assert connected
            await sync_to_async(_ingest)("live-redis", "e1")
            message = await communicator.receive_json_from(timeout=3)
            assert message["deltas"] == [{"saga_id": "live-redis", "version": 1}]
            await communicator.disconnect()

        asyncio.run(main())
    finally:
        channel_layers.backends.clear()
