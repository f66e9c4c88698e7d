"""Broker transports: one interface, chosen by ``BROKER_URL``'s scheme."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from outbox.transports.base import Outgoing, Permanent, Transport, TransportError

__all__ = ["Outgoing", "Permanent", "Transport", "TransportError", "transport_from_url"]

SUPPORTED = (
    "inprocess://, amqp://, amqps://, redis://, rediss://, nats://, tls:// (NATS over TLS), "
    "webhook://"
)


def transport_from_url(url: str) -> Transport:
    """The transport for ``url``'s scheme:

    - ``inprocess://`` (the embedded default);
    - ``amqp://`` / ``amqps://``: RabbitMQ;
    - ``redis://host:port/db`` / ``rediss://``: Redis Streams;
    - ``nats://host:port`` / ``tls://host:port``: NATS JetStream;
    - ``webhook://[?timeout=SECONDS&workers=N]``: HTTP POSTs to the ``OUTBOX_WEBHOOKS``
      subscriptions.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "inprocess":
        from outbox.transports.inprocess import InProcessTransport

        return InProcessTransport()
    if scheme in ("amqp", "amqps"):
        from outbox.transports.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(url)
    if scheme in ("redis", "rediss"):
        from outbox.transports.redis_streams import RedisStreamsTransport

        return RedisStreamsTransport(url)
    if scheme in ("nats", "tls"):
        from outbox.transports.jetstream import JetStreamTransport

        return JetStreamTransport(url)
    if scheme == "webhook":
        return _webhook_transport(parts.netloc, parts.query)
    raise ValueError(f"BROKER_URL: unsupported scheme '{scheme}' (supported: {SUPPORTED})")


def _webhook_transport(netloc: str, query: str) -> Transport:
    from django.conf import settings

    from outbox.transports.webhook import (
        DEFAULT_TIMEOUT,
        DEFAULT_WORKERS,
        WebhookTransport,
        subscriptions_from_setting,
    )

    if netloc:
        raise ValueError("BROKER_URL: webhook:// takes no host; the URLs come from OUTBOX_WEBHOOKS")
    options = {name: values[-1] for name, values in parse_qs(query).items()}
    if unknown := set(options) - {"timeout", "workers"}:
        raise ValueError(f"BROKER_URL: webhook:// options are timeout and workers, not {unknown}")
    try:
        timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        workers = int(options.get("workers", DEFAULT_WORKERS))
    except ValueError as exc:
        raise ValueError(f"BROKER_URL: webhook:// options: {exc}") from exc
    return WebhookTransport(
        subscriptions_from_setting(getattr(settings, "OUTBOX_WEBHOOKS", {})),
        timeout=timeout,
        workers=workers,
    )
