"""Message versions: a registry of message types, their current version and upcasters.

The event-versioning pattern: every message carries its ``version``; a
consumer always sees the *current* shape, because each registered upcaster
turns version N into N + 1 and they chain (v1 -> v2 -> v3). Old messages keep
flowing during a phased migration: publishers may still send v1 while
consumers already expect v3. A version the registry does not know (newer than
current, or a missing link in the chain) is :class:`UnknownVersion`: a clear
error, and the relay marks such a message dead instead of sending it.

The telemetry protocol registers itself here too (``tracking.protocol``), so
ingest and the outbox upcast the same way. How to add a version: docs/outbox.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class UnknownVersion(ValueError):
    """A message of a version this deployment cannot turn into the current one."""


@dataclass
class MessageType:
    name: str
    current: int = 1
    upcasters: dict[int, Upcaster] = field(default_factory=dict)  # from N to N + 1

    def supported(self) -> tuple[int, ...]:
        """The versions that reach ``current`` through the chain."""
        out = [self.current]
        version = self.current - 1
        while version >= 1 and version in self.upcasters:
            out.append(version)
            version -= 1
        return tuple(sorted(out))

    def upcast(self, version: int, payload: dict[str, Any]) -> dict[str, Any]:
        if version not in self.supported():
            raise UnknownVersion(
                f"{self.name}: unknown version {version}; supported: "
                + ", ".join(map(str, self.supported()))
            )
        data = dict(payload)
        while version < self.current:
            data = self.upcasters[version](data)
            version += 1
        return data


_registry: dict[str, MessageType] = {}
_lock = threading.Lock()


def message_type(name: str, *, current: int = 1) -> MessageType:
    """Register (or fetch) a message type and set its current version."""
    if current < 1:
        raise ValueError("current: an integer >= 1")
    with _lock:
        entry = _registry.setdefault(name, MessageType(name))
        entry.current = max(entry.current, current)
        return entry


def upcaster(name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Decorator: ``fn(payload_v_N) -> payload_v_N+1`` for message type ``name``.

    Registering the upcaster from N also makes N + 1 at least the current version.
    """

    def register(fn: Upcaster) -> Upcaster:
        entry = message_type(name, current=from_version + 1)
        with _lock:
            if from_version in entry.upcasters:
                raise ValueError(f"{name}: an upcaster from version {from_version} exists already")
            entry.upcasters[from_version] = fn
        return fn

    return register


def registered(name: str) -> MessageType | None:
    return _registry.get(name)


def upcast(name: str, version: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``payload`` of ``version`` in the current shape: (current version, payload).

    Types nobody registered pass through unchanged.
    """
    entry = _registry.get(name)
    if entry is None:
        return version, payload
    return entry.current, entry.upcast(version, payload)


def check(name: str, version: int) -> None:
    """Raise :class:`UnknownVersion` when a registered type cannot reach its current version."""
    entry = _registry.get(name)
    if entry is not None and version not in entry.supported():
        entry.upcast(version, {})  # raises with the message
