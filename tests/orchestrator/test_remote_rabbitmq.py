"""Remote steps over a real RabbitMQ: a test payment service obeys commands and replies (twice)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from django.db import connection, connections

import outbox
from orchestrator.engine import COMMANDS_TOPIC, REPLIES_TOPIC, saga_start
from orchestrator.models import SagaRun
from orchestrator.replies import CONSUMER, REPLY_TYPE, replies_consume
from orchestrator.worker import Worker
from outbox.consumers import run_rabbitmq_consumer
from outbox.inbox import Incoming
from outbox.relay import RelaySettings
from tests.conftest import need
from tests.outbox.helpers import relay_through
from tests.outbox.test_rabbitmq import AMQP_URL, _delete_queue, _reachable

pytestmark = pytest.mark.django_db(transaction=True)
CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)


def test_remote_steps_complete_over_rabbitmq_and_a_duplicate_reply_changes_nothing() -> None:
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    # consumer threads and this one write at once: the test database on SQLite is one
    # in-memory database with table locks that fail at once ("database table is locked")
    need(connection.vendor == "postgresql", "needs PostgreSQL: several threads write at once")
    service_queue = f"test-payment-{uuid.uuid4().hex[:8]}"
    obeyed: list[str] = []

    def payment(message: Incoming) -> None:
        """The payment service: charge, then reply through its own outbox — twice,
        as an at-least-once service may."""
        command = message.payload
        obeyed.append(command["action"])
        for _ in range(2):
            outbox.publish(
                topic=REPLIES_TOPIC,
                key=command["saga_id"],
                type=REPLY_TYPE,
                payload={
                    "command_id": command["command_id"],
                    "ok": True,
                    "result": {"charged": command["data"]["amount"]},
                },
            )

    stop = threading.Event()
    runners = [
        threading.Thread(
            target=run_rabbitmq_consumer,
            kwargs={
                "url": AMQP_URL,
                "consumer": service_queue,
                "topic": COMMANDS_TOPIC,
                "binding": "payment.#",
                "handler": payment,
                "stop": stop,
            },
        ),
        threading.Thread(target=replies_consume, args=(stop, AMQP_URL)),
    ]
    for runner in runners:
        runner.start()
    try:
        time.sleep(1.0)  # queues declared and bound
        saga_start(saga_type="test-remote", saga_id="rmq-1", data={"amount": 42})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            Worker().drain()
            relay_through(AMQP_URL, CFG)
            if SagaRun.objects.get().status == "completed":
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for runner in runners:
            runner.join(15)
        connections.close_all()
        asyncio.run(_delete_queue(service_queue))
        asyncio.run(_delete_queue(CONSUMER))
    run = SagaRun.objects.get()
    assert run.status == "completed", run.waiting
    assert obeyed == ["charge"]
    assert run.results["charge_payment"] == {"charged": 42}
    assert run.steps.get(name="charge_payment").attempt == 1
