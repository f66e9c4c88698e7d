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

import logging
import threading

from django.conf import settings

from orchestrator.engine import REPLIES_TOPIC, step_reply
from outbox.consumers import run_consumer
from outbox.inbox import Incoming
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
    try:
        run_consumer(
            url or settings.BROKER_URL,
            consumer=CONSUMER,
            topic=REPLIES_TOPIC,
            handler=reply_handle,
            stop=stop,
        )
    except ValueError as exc:
        log.warning("orchestrator: %s; remote steps time out", exc)
