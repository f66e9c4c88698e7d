"""Incident alerts leave through the outbox and reach a real RabbitMQ queue and a webhook."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from outbox.relay import RelaySettings
from tests.conftest import need
from tests.outbox.helpers import relay_through
from tests.outbox.test_rabbitmq import AMQP_URL, _bound_queue, _reachable, _take
from tests.outbox.test_webhook_transport import SECRETS, receiver, verify  # noqa: F401 (fixture)
from tests.tracking.test_detector import at, start
from tracking.detector import detect_pass
from tracking.incidents import TOPIC, incident_resolve
from tracking.models import Incident
from tracking.policy import policy_invalidate

CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_policy() -> Any:
    policy_invalidate()
    yield
    policy_invalidate()


def test_opened_and_resolved_alerts_reach_a_rabbitmq_queue() -> None:
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    start("alert-1")
    detect_pass(now=at(901))
    incident = Incident.objects.get()
    incident_resolve(incident_id=incident.pk, user="olivia", note="restarted the consumer")

    async def scenario() -> list[Any]:
        connection, _, queue = await _bound_queue(TOPIC)
        async with connection:
            result = await asyncio.to_thread(relay_through, AMQP_URL, CFG)
            assert result.published == 2
            return await _take(queue, 2)

    opened, resolved = asyncio.run(scenario())
    assert opened.routing_key == "sagaadmin.incident.opened"
    assert resolved.routing_key == "sagaadmin.incident.resolved"
    body = json.loads(opened.body)
    assert (body["kind"], body["saga_id"], body["incident_id"]) == ("stuck", "alert-1", incident.pk)
    assert body["evidence"] == [e["event_id"] for e in incident.evidence]
    assert json.loads(resolved.body)["note"] == "restarted the consumer"
    assert opened.headers["sagaadmin-key"] == "alert-1"  # one saga's alerts keep their order


def test_alerts_reach_a_webhook_subscriber_signed(receiver: Any, settings: Any) -> None:  # noqa: F811
    settings.OUTBOX_WEBHOOKS = {TOPIC: [{"url": f"{receiver.url}/a", "secret": SECRETS["/a"]}]}
    start("alert-2")
    detect_pass(now=at(901))

    result = relay_through("webhook://?timeout=5", CFG)

    assert result.published == 1
    [got] = receiver.delivered("/a")
    assert got["headers"]["X-Sagaadmin-Type"] == "sagaadmin.incident.opened"
    assert verify(SECRETS["/a"], got["headers"], got["body"])
    payload = json.loads(got["body"])
    assert (payload["kind"], payload["saga_id"], payload["status"]) == ("stuck", "alert-2", "open")
