"""Websocket consumer for live pages: forwards saga deltas to logged-in viewers."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from tracking.live import LIVE_GROUP
from tracking.roles import can_view


class SagaLiveConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not await database_sync_to_async(can_view)(user):
            await self.close(code=4403)
            return
        await self.channel_layer.group_add(LIVE_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(LIVE_GROUP, self.channel_name)

    async def sagas_changed(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "sagas.changed", "deltas": event["deltas"]})
