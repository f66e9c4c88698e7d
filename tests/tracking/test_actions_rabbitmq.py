"""An operator's action on an external saga, over a real RabbitMQ: the payment service obeys.

The operator POSTs retry_step; the relay publishes the command on ``sagaadmin.commands``
(routing key ``payment.retry_step``); a payment service consuming ``payment.#`` reports
``step.started`` naming the command (acknowledged), later ``step.succeeded`` and
``saga.completed`` (done), and the saga's timeline ends completed.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, connections, transaction
from django.test import Client
from django.utils import timezone

from orchestrator.engine import COMMANDS_TOPIC
from outbox.consumers import run_rabbitmq_consumer
from outbox.inbox import Incoming
from outbox.relay import RelaySettings
from tests.conftest import need, role_group
from tests.outbox.helpers import relay_through
from tests.outbox.test_rabbitmq import AMQP_URL, _delete_queue, _reachable
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import AuditEntry, OperatorAction, Saga

pytestmark = pytest.mark.django_db(transaction=True)
CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)


def report(saga_id: str, *events: dict[str, Any]) -> None:
    """As the payment service: its events through ingest (answers forwarded after commit)."""
    raws = [
        json.dumps(
            {
                "id": uuid.uuid4().hex,
                "saga_id": saga_id,
                "occurred_at": timezone.now().isoformat(),
                **e,
            }
        ).encode()
        for e in events
    ]
    with transaction.atomic():
        result = events_ingest(service=service_get_or_create(name="payment"), raws=raws)
    assert all(r.status == "accepted" for r in result.results), result


def wait_for(condition: Callable[[], bool], *, relay: bool = True, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if relay:
            relay_through(AMQP_URL, CFG)
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_an_operators_retry_is_obeyed_by_the_service_over_rabbitmq() -> None:
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    # the service's threads and this one write at once: the test database on SQLite is
    # one in-memory database with table locks that fail at once ("database table is locked")
    need(connection.vendor == "postgresql", "needs PostgreSQL: several threads write at once")
    report(
        "pay-1",
        {"type": "saga.started", "saga_type": "order"},
        {"type": "step.started", "step": "charge"},
        {"type": "step.failed", "step": "charge", "error": {"type": "Timeout", "retryable": True}},
    )
    service_queue = f"test-payment-{uuid.uuid4().hex[:8]}"
    received: list[dict[str, Any]] = []
    work: queue.Queue[dict[str, Any]] = queue.Queue()
    proceed = threading.Event()
    stop = threading.Event()

    def payment(message: Incoming) -> None:
        """The payment service's consumer: take the command, say it started (in the
        inbox's transaction), and leave the charge to its worker."""
        command = message.payload
        received.append({"type": message.type, **command})
        report(
            command["saga_id"],
            {
                "type": "step.started",
                "step": command["step"],
                "attempt": command["attempt"],
                "idempotency_key": command["idempotency_key"],
                "attributes": {"command_id": command["command_id"]},
            },
        )
        work.put(command)

    def payment_worker() -> None:
        """Charges once the test saw the acknowledgement, then reports the outcome."""
        try:
            command = work.get(timeout=60)
            proceed.wait(60)
            answer = {"command_id": command["command_id"]}
            report(
                command["saga_id"],
                {
                    "type": "step.succeeded",
                    "step": command["step"],
                    "attempt": command["attempt"],
                    "attributes": answer,
                },
                {"type": "saga.completed", "attributes": answer},
            )
        finally:
            connections.close_all()

    consumer = threading.Thread(
        target=run_rabbitmq_consumer,
        kwargs={
            "url": AMQP_URL,
            "consumer": service_queue,
            "topic": COMMANDS_TOPIC,
            "binding": "payment.#",
            "handler": payment,
            "stop": stop,
        },
    )
    worker = threading.Thread(target=payment_worker)
    consumer.start()
    worker.start()
    statuses: list[str] = []
    try:
        time.sleep(1.0)  # queue declared and bound
        operator = get_user_model().objects.create_user("otto", password="pw-x-12345")
        operator.groups.add(role_group("operator"))
        client = Client()
        client.force_login(operator)
        saga = Saga.objects.get(saga_id="pay-1")

        # when the operator retries the failed step
        response = client.post(
            "/api/v1/sagas/pay-1/actions/retry_step",
            {"reason": "the card issuer is back", "expected_version": saga.version},
            content_type="application/json",
        )
        assert response.status_code == 202, response.content
        answer = response.json()

        def progress() -> str:
            status = str(client.get(f"/api/v1/actions/{answer['id']}").json()["status"])
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            return status

        progress()
        # then the relay publishes the command and the service acknowledges it ...
        assert wait_for(lambda: progress() == "acknowledged"), statuses
        proceed.set()
        # ... and finishes it
        assert wait_for(lambda: progress() == "done", relay=False), statuses
    finally:
        proceed.set()
        stop.set()
        consumer.join(15)
        worker.join(15)
        connections.close_all()
        asyncio.run(_delete_queue(service_queue))

    assert statuses == ["dispatched", "acknowledged", "done"]
    [command] = received
    assert command["type"] == "payment.retry_step"
    assert (command["command_id"], command["action"], command["step"]) == (
        answer["command_id"],
        "retry_step",
        "charge",
    )
    assert (command["attempt"], command["reason"], command["requested_by"]) == (
        2,
        "the card issuer is back",
        "otto",
    )
    record = OperatorAction.objects.get()
    assert record.dispatched_at <= record.acknowledged_at <= record.finished_at
    assert (record.service, record.error) == ("payment", None)
    saga = Saga.objects.get(saga_id="pay-1")
    assert saga.status == "completed"
    charge = saga.steps.get(name="charge")
    assert (charge.status, charge.attempt) == ("succeeded", 2)
    [entry] = AuditEntry.objects.all()
    assert (entry.outcome, entry.actor, entry.operator_action_id) == (
        "dispatched",
        "otto",
        record.pk,
    )


# What an obedient payment service reports for each command (all naming the command).
OBEY: dict[str, list[dict[str, Any]]] = {
    "compensate": [
        {"type": "compensation.started", "step": "reserve"},
        {"type": "compensation.succeeded", "step": "reserve"},
        {"type": "saga.compensated"},
    ],
    "skip_step": [
        {"type": "step.succeeded", "step": "charge", "attempt": 2},
        {"type": "saga.completed"},
    ],
    "cancel": [{"type": "saga.cancelled"}],
    "terminate": [{"type": "saga.cancelled"}],
    "retry_compensation": [
        {"type": "compensation.started", "step": "reserve", "attempt": 2},
        {"type": "compensation.succeeded", "step": "reserve", "attempt": 2},
        {"type": "saga.compensated"},
    ],
}
ENDS = {
    "compensate": "compensated",
    "skip_step": "completed",
    "cancel": "cancelled",
    "terminate": "cancelled",
    "retry_compensation": "compensated",
}


def test_every_external_action_is_obeyed_over_rabbitmq_and_closes_the_loop() -> None:
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    begun = [
        {"type": "saga.started", "saga_type": "order"},
        {"type": "step.started", "step": "reserve"},
        {"type": "step.succeeded", "step": "reserve"},
        {"type": "step.started", "step": "charge"},
        {"type": "step.failed", "step": "charge", "error": {"type": "Declined"}},
    ]
    for action in OBEY:
        extra: list[dict[str, Any]] = []
        if action == "retry_compensation":
            extra = [
                {"type": "compensation.started", "step": "reserve"},
                {"type": "compensation.failed", "step": "reserve", "error": {"type": "Timeout"}},
                {"type": "saga.compensation_failed"},
            ]
        report(f"obey-{action}", *begun, *extra)
    service_queue = f"test-payment-{uuid.uuid4().hex[:8]}"
    stop = threading.Event()

    def payment(message: Incoming) -> None:
        command = message.payload
        answer = {"command_id": command["command_id"]}
        report(command["saga_id"], *({**e, "attributes": answer} for e in OBEY[command["action"]]))

    consumer = threading.Thread(
        target=run_rabbitmq_consumer,
        kwargs={
            "url": AMQP_URL,
            "consumer": service_queue,
            "topic": COMMANDS_TOPIC,
            "binding": "payment.#",
            "handler": payment,
            "stop": stop,
        },
    )
    consumer.start()
    try:
        time.sleep(1.0)
        admin = get_user_model().objects.create_user("ada", password="pw-x-12345")
        admin.groups.add(role_group("admin"))
        client = Client()
        client.force_login(admin)
        ids = {}
        for action in OBEY:
            saga = Saga.objects.get(saga_id=f"obey-{action}")
            response = client.post(
                f"/api/v1/sagas/obey-{action}/actions/{action}",
                {"reason": f"runbook: {action}", "expected_version": saga.version},
                content_type="application/json",
            )
            assert response.status_code == 202, (action, response.content)
            ids[action] = response.json()["id"]
        assert wait_for(
            lambda: set(OperatorAction.objects.values_list("status", flat=True)) == {"done"}
        ), list(OperatorAction.objects.values_list("action", "status"))
    finally:
        stop.set()
        consumer.join(15)
        connections.close_all()
        asyncio.run(_delete_queue(service_queue))
    for action, end in ENDS.items():
        saga = Saga.objects.get(saga_id=f"obey-{action}")
        assert (action, saga.status, saga.anomalies) == (action, end, [])
        assert OperatorAction.objects.get(pk=ids[action]).service == "payment"
