"""Replies of services to remote steps' commands, from the broker.

A service answers a command (orchestrator/engine.py ``_send``) by publishing a
``sagaadmin.command.reply`` message on ``sagaadmin.replies``:
``{"command_id", "ok", "result", "error": {"type", "message", "retryable"}}``.
:func:`replies_consume` (a thread of ``run_worker``) reads them with the
outbox's consumer runners, each applied once through the inbox. A service
can instead report ``step.succeeded`` / ``step.failed`` telemetry with
``attributes.command_id``: tracking passes those to :func:`step_reply` too.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from django.conf import settings

from orchestrator.engine import REPLIES_TOPIC, step_reply
from outbox.inbox import Incoming, inbox_apply
from outbox.versions import message_type

log = logging.getLogger(__name__)
REPLY_TYPE = "sagaadmin.command.reply"
CONSUMER = "sagaadmin-orchestrator"
message_type(REPLY_TYPE)


class BadReply(ValueError):
    pass


def reply_handle(message: Incoming) -> None:
    """Apply one reply (inside the inbox's transaction). A malformed one is logged and dropped."""
    payload = message.payload
    if not isinstance(payload, dict):
        log.warning("orchestrator: reply %s is not an object; dropped", message.id)
        return
    command_id, ok = payload.get("command_id"), payload.get("ok")
    if not isinstance(command_id, str) or not isinstance(ok, bool):
        log.warning(
            "orchestrator: reply %s needs command_id (text) and ok (true/false)", message.id
        )
        return
    error = payload.get("error")
    if not step_reply(
        command_id=command_id,
        ok=ok,
        result=payload.get("result"),
        error=error if isinstance(error, dict) else None,
    ):
        log.info("orchestrator: reply to %s came late or twice; ignored", command_id)


def replies_consume(stop: threading.Event, url: str | None = None) -> None:
    """Consume ``sagaadmin.replies`` from the configured broker until ``stop``."""
    url = url or settings.BROKER_URL
    scheme = url.split(":", 1)[0]
    kwargs: dict[str, Any] = {
        "consumer": CONSUMER,
        "topic": REPLIES_TOPIC,
        "handler": reply_handle,
        "stop": stop,
    }
    if scheme in ("amqp", "amqps"):
        from outbox.consumers import run_rabbitmq_consumer

        run_rabbitmq_consumer(url, **kwargs)
    elif scheme in ("redis", "rediss"):
        from outbox.consumers import run_redis_consumer

        run_redis_consumer(url, **kwargs)
    elif scheme == "nats":
        from outbox.consumers import run_nats_consumer

        run_nats_consumer(url, **kwargs)
    elif scheme == "inprocess":
        from outbox.transports.inprocess import subscribe

        unsubscribe = subscribe(REPLIES_TOPIC, _inprocess_reply)
        stop.wait()
        unsubscribe()
    else:
        log.warning("orchestrator: no reply consumer for %s; remote steps time out", scheme)


def _inprocess_reply(message: Any) -> None:
    from outbox.inbox import incoming

    inbox_apply(
        CONSUMER,
        incoming(
            id=str(message.id),
            topic=message.topic,
            key=message.key,
            type=message.type,
            version=message.version,
            payload=_json(message.payload),
            headers=message.headers,
        ),
        reply_handle,
    )


def _json(text: Any) -> Any:
    return json.loads(text) if isinstance(text, str | bytes) else text
