"""The embedded default: delivers to handlers registered in this process."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

from outbox.transports.base import Outgoing, Skipped

log = logging.getLogger(__name__)
Handler = Callable[[Outgoing], None]

_handlers: dict[str, list[Handler]] = defaultdict(list)
_lock = threading.Lock()


def subscribe(topic: str, handler: Handler) -> Callable[[], None]:
    """Call ``handler`` for each message published on ``topic``; returns an unsubscribe."""
    with _lock:
        _handlers[topic].append(handler)

    def unsubscribe() -> None:
        with _lock:
            if handler in _handlers[topic]:
                _handlers[topic].remove(handler)

    return unsubscribe


def subscribed(topic: str) -> bool:
    with _lock:
        return bool(_handlers.get(topic))


class InProcessTransport:
    """A message is confirmed when every handler of its topic returned (none: confirmed).

    After a handler fails, later messages of the same key in the batch are not
    delivered (``Skipped``), so a retry cannot overtake them.
    """

    def publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        results: list[BaseException | None] = []
        failed_keys: set[tuple[str, str]] = set()
        for message in messages:
            if (message.topic, message.key) in failed_keys:
                results.append(Skipped("an earlier message of this key failed"))
                continue
            with _lock:
                handlers = list(_handlers.get(message.topic, ()))
            try:
                for handler in handlers:
                    handler(message)
            except Exception as exc:
                log.warning("in-process handler failed for %s: %s", message.id, exc)
                failed_keys.add((message.topic, message.key))
                results.append(exc)
            else:
                results.append(None)
        return results

    def close(self) -> None:
        pass
