"""What the relay hands a transport, and what it expects back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID


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
