"""Live updates: after a commit, tell open pages which sagas changed, with versions.

Deltas are small (saga id + version). A page that holds an older version of a
saga fetches the fresh fragment; a version gap needs no special case because
the fragment is always the whole current state (docs/dashboard.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)
LIVE_GROUP = "sagas"
_local = threading.local()
# Pushes handed to the loop and not yet done, at most this many per process: past
# it (a slow channel layer) a flush waits for its push again, as before.
MAX_PUSHES_IN_FLIGHT = 100
_in_flight = threading.BoundedSemaphore(MAX_PUSHES_IN_FLIGHT)


@contextmanager
def pushes_on(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Hand this thread's pushes to ``loop`` without waiting for them.

    For the ingest fast path's flush threads: their transactions commit while
    the server's event loop serves requests; waiting for the loop to run each
    push (``async_to_sync``) would hold the next flush back for nothing. At most
    ``MAX_PUSHES_IN_FLIGHT`` pushes wait on the loop; past that (the channel
    layer is slow) pushes wait again, so they cannot pile up.
    """
    _local.loop = loop
    try:
        yield
    finally:
        _local.loop = None


def notify_sagas_changed(*, versions: Iterable[tuple[str, int]]) -> None:
    """Schedule one push for these (saga id, version) pairs after the transaction commits."""
    deltas = [{"saga_id": s, "version": v} for s, v in versions]
    if deltas:
        transaction.on_commit(lambda: _push(deltas))


def _push(deltas: list[dict[str, object]]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "sagas.changed", "deltas": deltas}
    loop = getattr(_local, "loop", None)
    try:
        if loop is not None and loop.is_running() and _in_flight.acquire(blocking=False):
            future = asyncio.run_coroutine_threadsafe(layer.group_send(LIVE_GROUP, message), loop)
            future.add_done_callback(lambda f: _pushed(f, len(deltas)))
        else:
            async_to_sync(layer.group_send)(LIVE_GROUP, message)
    except Exception:  # a live page may miss a push; it must never fail ingest
        log.exception("live: could not push %d saga deltas", len(deltas))


def _pushed(future: Future[None], count: int) -> None:
    _in_flight.release()
    if not future.cancelled() and future.exception() is not None:
        log.error("live: could not push %d saga deltas", count, exc_info=future.exception())
