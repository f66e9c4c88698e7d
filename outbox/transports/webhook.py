"""HTTP webhooks: POST each message to the URLs subscribed to its topic, signed with HMAC-SHA256.

Subscriptions come from the ``OUTBOX_WEBHOOKS`` setting (JSON: topic -> list of
``{"url": ..., "secret": ...}``); ``BROKER_URL=webhook://`` selects this
transport, ``webhook://?timeout=5&workers=8`` tunes it. The body is the
payload's bytes; the headers carry the id, type, key, version, a timestamp
and ``X-Sagaadmin-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``.

A message is confirmed when every URL of its topic answered 2xx (a topic
without subscriptions: confirmed, as a topic exchange without bindings drops
it). A 5xx, 408, 429, a redirect (not followed), a timeout or a connection
error is a failure the relay retries; any other 4xx is :class:`Permanent`. With
several URLs, a transient failure wins over a permanent one (the message is
retried until only the permanent refusal is left), and a retry posts to every
URL again: receivers dedupe by ``X-Sagaadmin-Id``.

Keys are delivered in parallel (``workers`` threads); one key's messages go
one after the other, and after a failure the rest of that key in the batch is
not sent (``Skipped``), so a retry cannot be overtaken.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from outbox.transports.base import Outgoing, Permanent, Skipped, TransportError

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 10.0
DEFAULT_WORKERS = 8
RETRYABLE_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests: try again later
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class Subscription:
    url: str
    secret: str

    @property
    def display_url(self) -> str:
        """The URL without its query (which may carry a token), for errors and logs."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"


def subscriptions_from_setting(value: Any) -> dict[str, list[Subscription]]:
    """Validate ``OUTBOX_WEBHOOKS``; a ValueError names the bad entry."""
    if not isinstance(value, Mapping):
        raise ValueError("OUTBOX_WEBHOOKS: a JSON object mapping topic -> [{url, secret}, ...]")
    out: dict[str, list[Subscription]] = {}
    for topic, entries in value.items():
        if not isinstance(entries, list):
            raise ValueError(f"OUTBOX_WEBHOOKS[{topic!r}]: a list of {{url, secret}} objects")
        subs = []
        for i, entry in enumerate(entries):
            where = f"OUTBOX_WEBHOOKS[{topic!r}][{i}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: an object with url and secret")
            url, secret = entry.get("url"), entry.get("secret")
            if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"{where}.url: an http:// or https:// URL")
            if not urlsplit(url).hostname:
                raise ValueError(f"{where}.url: no host")
            if not isinstance(secret, str) or not secret:
                raise ValueError(f"{where}.secret: a non-empty string")
            subs.append(Subscription(url=url, secret=secret))
        out[str(topic)] = subs
    return out


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>`` keyed with ``secret``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


class WebhookTransport:
    def __init__(
        self,
        subscriptions: Mapping[str, Sequence[Subscription]],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        workers: int = DEFAULT_WORKERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout <= 0 or workers < 1:
            raise ValueError("webhook transport: timeout > 0 and workers >= 1")
        self.subscriptions = {topic: list(subs) for topic, subs in subscriptions.items()}
        self.timeout = timeout
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="outbox-webhook")

    def publish(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        if not messages:
            return []
        by_key: dict[tuple[str, str], list[int]] = {}
        for i, message in enumerate(messages):
            by_key.setdefault((message.topic, message.key), []).append(i)
        groups = list(by_key.values())
        results: list[BaseException | None] = [None] * len(messages)
        try:
            answers = self._pool.map(lambda ix: self._send_key([messages[i] for i in ix]), groups)
            for indexes, key_answers in zip(groups, answers, strict=True):
                for i, answer in zip(indexes, key_answers, strict=True):
                    results[i] = answer
        except Exception as exc:  # not expected: _send_key answers per message
            error = TransportError(f"webhook publish failed: {type(exc).__name__}: {exc}")
            return [error for _ in messages]
        return results

    def _send_key(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        """One key's messages in order; after a failure the rest are Skipped."""
        answers: list[BaseException | None] = []
        for message in messages:
            if answers and answers[-1] is not None:
                answers.append(Skipped("an earlier message of this key failed"))
                continue
            answers.append(self._send(message))
        return answers

    def _send(self, message: Outgoing) -> BaseException | None:
        errors = [self._post(message, sub) for sub in self.subscriptions.get(message.topic, ())]
        failures = [e for e in errors if e is not None]
        transient = [e for e in failures if not isinstance(e, Permanent)]
        if transient:
            return transient[0]
        return failures[0] if failures else None

    def _post(self, message: Outgoing, sub: Subscription) -> BaseException | None:
        timestamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sagaadmin-outbox",
            "X-Sagaadmin-Id": str(message.id),
            "X-Sagaadmin-Type": message.type,
            "X-Sagaadmin-Key": message.key,
            "X-Sagaadmin-Version": str(message.version),
            "X-Sagaadmin-Timestamp": timestamp,
            "X-Sagaadmin-Signature": signature(sub.secret, timestamp, message.payload),
        }
        for name, value in headers.items():
            if not _PRINTABLE_ASCII.fullmatch(value):
                return Permanent(f"{name}: {value!r} is not printable ASCII, cannot be a header")
        parts = urlsplit(sub.url)
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(parts.hostname or "", parts.port, timeout=self.timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        where = f"webhook {sub.display_url}"
        try:
            try:
                connection.connect()
            except OSError as exc:
                return TransportError(f"{where} unreachable: {type(exc).__name__}: {exc}")
            connection.request("POST", target, body=message.payload, headers=headers)
            response = connection.getresponse()
            snippet = response.read(500).decode("utf-8", "replace").strip()
        except TimeoutError:
            return TransportError(f"{where} timed out after {self.timeout:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return TransportError(f"{where} failed: {type(exc).__name__}: {exc}")
        finally:
            connection.close()
        status = response.status
        if 200 <= status < 300:
            return None
        answer = f"{where} answered {status} {response.reason}"
        if snippet:
            answer += f": {snippet}"
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            return Permanent(answer)
        if 300 <= status < 400:
            answer += " (redirects are not followed: configure the final URL)"
        return TransportError(answer)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
