"""Live updates: after a commit, tell open pages which sagas changed, with versions.

Deltas are small (saga id + version). A page that holds an older version of a
saga fetches the fresh fragment; a version gap needs no special case because
the fragment is always the whole current state (docs/dashboard.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)
LIVE_GROUP = "sagas"


def notify_sagas_changed(*, versions: Iterable[tuple[str, int]]) -> None:
    """Schedule one push for these (saga id, version) pairs after the transaction commits."""
    deltas = [{"saga_id": s, "version": v} for s, v in versions]
    if deltas:
        transaction.on_commit(lambda: _push(deltas))


def _push(deltas: list[dict[str, object]]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(LIVE_GROUP, {"type": "sagas.changed", "deltas": deltas})
    except Exception:  # a live page may miss a push; it must never fail ingest
        log.exception("live: could not push %d saga deltas", len(deltas))
