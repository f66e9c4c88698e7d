"""What the relay hands a transport, and what it expects back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from uuid import UUID

T = TypeVar("T")


class TransportError(Exception):
    """The broker did not take a message (refused, unreachable, timed out)."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    id: UUID
    topic: str
    key: str
    type: str
    version: int
    payload: bytes  # the canonical JSON publish() stored
    headers: dict[str, str] = field(default_factory=dict)


class Transport(Protocol):
    def publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        """Send ``messages`` (in this order); per message ``None`` once the broker
        confirmed it, else the error. Never raises for a single message's failure."""
        ...

    def close(self) -> None: ...


class Skipped(TransportError):
    """Not sent because an earlier message of the same key failed in this batch.

    The relay leaves it pending without counting an attempt; it goes after
    the earlier one succeeds (per-key order).
    """


class Permanent(TransportError):
    """The receiver refused the message for good (e.g. an HTTP 4xx): dead at once, no retry."""


class BackgroundLoop:
    """An asyncio event loop on a daemon thread, so an async broker client can
    serve the synchronous relay (which pipelines a batch and waits for all acks)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait; on timeout cancel it (do not leave it running)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()
