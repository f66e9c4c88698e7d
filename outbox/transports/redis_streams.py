"""Redis Streams: XADD to a stream named after the topic, one pipelined round trip per batch.

Each message becomes one stream entry (ID ``*``: Redis numbers it) with the
fields ``id`` (the outbox id: consumers dedupe on it), ``key``, ``type``,
``version``, ``payload`` (the canonical JSON bytes, unchanged) and ``headers``
(the message's own headers as a JSON object). Redis answers each XADD after it
appended the entry; that answer is the confirm. The batch goes out as one
non-transactional pipeline: Redis runs the commands in order, so one key's
messages land in order, and answers per command, so one refused XADD (say, the
topic names a key that is not a stream) fails only its own message.

The client does not retry by itself (``retries=0``): a broken connection fails
the batch and the relay retries it, possibly appending entries that had made
it before the break a second time (at least once; consumers dedupe by ``id``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from outbox.transports.base import Outgoing, TransportError

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0


def entry_fields(message: Outgoing) -> dict[FieldT, EncodableT]:
    """The stream entry for ``message`` (what a consumer reads with XREAD / XREADGROUP)."""
    return {
        "id": str(message.id),
        "key": message.key,
        "type": message.type,
        "version": str(message.version),
        "payload": message.payload,
        "headers": json.dumps(message.headers, sort_keys=True, separators=(",", ":")),
    }


class RedisStreamsTransport:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=REPLY_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )

    def publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        if not messages:
            return []
        pipe = self._client.pipeline(transaction=False)
        for message in messages:
            pipe.xadd(message.topic, entry_fields(message))
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.ConnectionError as exc:
            error = TransportError(f"Redis unreachable: {type(exc).__name__}: {exc}")
            return [error for _ in messages]
        except Exception as exc:  # timed out or broke mid-batch: every answer is unknown
            error = TransportError(f"Redis publish failed: {type(exc).__name__}: {exc}")
            return [error for _ in messages]
        finally:
            pipe.reset()
        return [
            TransportError(f"Redis refused XADD to '{m.topic}': {reply}")
            if isinstance(reply, Exception)
            else None
            for m, reply in zip(messages, replies, strict=True)
        ]

    def close(self) -> None:
        self._client.close()
