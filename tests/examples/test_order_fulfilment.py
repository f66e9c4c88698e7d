"""The order-fulfilment example end to end on PostgreSQL and RabbitMQ.

Real pieces only: the four services consume ``shop.events`` and
``sagaadmin.commands`` from RabbitMQ through the outbox's consumer runners,
publish through their outboxes (a real relay thread), report with
``sagaclient`` over HTTP to a live Saga Admin; the orchestrator's worker and
reply consumer run as threads. Each injected fault must produce its status,
timeline and incident, and operator actions must finish what the faults left.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.utils import timezone

from examples.order_fulfilment.faults import ORDER_FAULTS
from examples.order_fulfilment.host import services_make, services_start
from examples.order_fulfilment.models import Order, Payment, Reservation, Shipment
from examples.order_fulfilment.services import (
    CHOREOGRAPHED,
    ORCHESTRATED,
    SERVICES,
    OrderService,
)
from examples.order_fulfilment.traffic import FLAVOURS, order_new, order_place
from orchestrator.models import SagaRun
from orchestrator.replies import CONSUMER, replies_consume
from orchestrator.worker import worker_run
from outbox.relay import Relay, RelaySettings
from outbox.transports import transport_from_url
from sagaclient import Reporter
from tests.conftest import need, role_group
from tests.outbox.test_rabbitmq import AMQP_URL, _delete_queue, _reachable
from tracking.actions import ActionInput, saga_action_run
from tracking.detector import detect_pass
from tracking.keys import service_key_create
from tracking.models import Incident, OperatorAction, Saga, SagaType, TelemetryEvent
from tracking.policy import policy_invalidate

pytestmark = pytest.mark.django_db(transaction=True)

# What each injected fault leaves behind, per flavour: (status, open incident kind).
EXPECTED = {
    ("orchestrated", ""): ("completed", None),
    ("orchestrated", "decline"): ("compensated", None),
    ("orchestrated", "outage"): ("completed", None),  # the orchestrator's retry succeeds
    ("orchestrated", "shortage"): ("compensated", None),
    ("orchestrated", "refund_fails"): ("compensation_failed", "compensation_failed"),
    ("orchestrated", "hang"): ("running", "stuck"),
    ("orchestrated", "in_doubt"): ("running", "in_doubt"),
    ("choreographed", ""): ("completed", None),
    ("choreographed", "decline"): ("compensated", None),
    ("choreographed", "outage"): ("failed", None),  # waits for an operator
    ("choreographed", "shortage"): ("compensated", None),
    ("choreographed", "refund_fails"): ("compensation_failed", "compensation_failed"),
    ("choreographed", "hang"): ("running", "stuck"),
    ("choreographed", "in_doubt"): ("running", "in_doubt"),
}


def _wait(condition: Callable[[], bool], seconds: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s: {what()}")


@pytest.fixture
def shop(live_server: Any, postgres: None) -> Iterator[dict[str, Reporter]]:
    """The four services, a relay, the orchestrator and its reply consumer, on RabbitMQ."""
    need(_reachable("127.0.0.1", 5672), "needs RabbitMQ on 127.0.0.1:5672")
    prefix = f"test-shop-{uuid.uuid4().hex[:8]}"
    reporters = {
        name: Reporter(
            live_server.url, service_key_create(service_name=name).secret, flush_interval=0.05
        )
        for name in SERVICES
    }
    for name in (ORCHESTRATED, CHOREOGRAPHED):  # quick detection, as the demo sets it
        SagaType.objects.create(name=name, stuck_after_seconds=2, in_doubt_after_seconds=2)
    policy_invalidate()
    stop = threading.Event()
    transport = transport_from_url(AMQP_URL)
    relay = Relay(transport, RelaySettings(batch_size=100, backoff_base=0.2, backoff_max=1.0))
    threads = services_start(
        services_make(list(SERVICES), reporters), stop, AMQP_URL, prefix=prefix
    )

    def relay_run(stop: threading.Event) -> None:
        try:
            relay.run(stop)
        finally:
            connections.close_all()

    for target, args in (
        (relay_run, (stop,)),
        (worker_run, (stop,)),
        (replies_consume, (stop, AMQP_URL)),
    ):
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        threads.append(thread)
    time.sleep(1.5)  # queues declared and bound before the first message
    try:
        yield reporters
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        transport.close()
        for reporter in reporters.values():
            reporter.close(timeout=5)
        connections.close_all()
        for name in SERVICES:
            for kind in ("events", "commands"):
                asyncio.run(_delete_queue(f"{prefix}-{name}-{kind}"))
        asyncio.run(_delete_queue(CONSUMER))


def _operator() -> Any:
    user = get_user_model().objects.create_user("olga", password="x")
    user.groups.add(role_group("operator"))
    return user


def _act(action: str, saga_id: str, user: Any, step: str = "") -> dict[str, Any]:
    return saga_action_run(
        ActionInput(
            action=action,
            saga_id=saga_id,
            actor=user,
            reason="test: the fault is fixed",
            expected_version=None,
            step=step,
        )
    )


def test_every_fault_ends_as_expected_and_operators_finish_what_it_left(
    shop: dict[str, Reporter],
) -> None:
    orders = OrderService(shop["order"])
    ids: dict[tuple[str, str], str] = {}
    for flavour in FLAVOURS:
        for fault in ("", *ORDER_FAULTS):
            order = order_new(flavour, fault)
            order_place(flavour, order, orders)
            ids[(flavour, fault)] = order["order_id"]

    def statuses() -> dict[tuple[str, str], str]:
        found = dict(Saga.objects.filter(saga_id__in=ids.values()).values_list("saga_id", "status"))
        return {case: found.get(saga_id, "-") for case, saga_id in ids.items()}

    def settled() -> bool:
        now = statuses()
        if any(now[case] != want for case, (want, _) in EXPECTED.items()):
            return False
        # the running ones have got as far as they will: shipping started, stock prepared
        hung = [ids[(f, "hang")] for f in FLAVOURS]
        doubt = [ids[(f, "in_doubt")] for f in FLAVOURS]
        return (
            TelemetryEvent.objects.filter(
                saga_id__in=hung, type="step.started", step="create_shipment"
            ).count()
            == 2
            and TelemetryEvent.objects.filter(saga_id__in=doubt, type="tx.prepared").count() == 2
        )

    _wait(settled, 90, lambda: str({c: s for c, s in statuses().items() if s != EXPECTED[c][0]}))

    # Timelines: the choreographed saga was reconstructed from four services' reports,
    # with the messages between them; the orchestrated outage took a second attempt.
    happy = Saga.objects.get(saga_id=ids[("choreographed", "")])
    assert set(happy.services.strip(",").split(",")) == set(SERVICES)
    types = set(TelemetryEvent.objects.filter(saga_id=happy.saga_id).values_list("type", flat=True))
    assert {"message.published", "message.consumed", "saga.completed"} <= types
    assert Shipment.objects.filter(order_id=happy.saga_id).exists()
    outage = SagaRun.objects.get(saga_id=ids[("orchestrated", "outage")])
    assert outage.steps.get(name="charge_payment").attempt == 2
    for flavour in FLAVOURS:
        short = ids[(flavour, "shortage")]
        assert Payment.objects.get(order_id=short).status == "refunded"
        assert Order.objects.get(order_id=short).status == "cancelled"
        assert not Shipment.objects.filter(order_id=short).exists()
        failed_refund = ids[(flavour, "refund_fails")]
        assert Payment.objects.get(order_id=failed_refund).status == "charged"
        doubt = ids[(flavour, "in_doubt")]
        assert Reservation.objects.get(order_id=doubt).status == "prepared"

    # The detector (thresholds 2 s) opens what each fault deserves, and nothing else.
    time.sleep(2.5)
    detect_pass(now=timezone.now() + timedelta(seconds=1))
    for case, (_, kind) in EXPECTED.items():
        kinds = set(
            Incident.objects.filter(saga__saga_id=ids[case], status="open").values_list(
                "kind", flat=True
            )
        )
        if kind is None:
            assert kinds == set(), (case, kinds)
        else:
            assert kind in kinds, (case, kinds)

    # Operators finish them: a retry of the failed payment completes the choreographed
    # saga; retrying the refund compensates; a retry of the hung shipment (orchestrated:
    # a new epoch, and the shipping service answers) completes.
    user = _operator()
    retried = _act("retry_step", ids[("choreographed", "outage")], user, "charge_payment")
    refunded = _act("retry_compensation", ids[("choreographed", "refund_fails")], user)
    _act("retry_compensation", ids[("orchestrated", "refund_fails")], user)
    _act("retry_step", ids[("orchestrated", "hang")], user, "create_shipment")
    _act("skip_step", ids[("choreographed", "hang")], user, "create_shipment")
    _act("cancel", ids[("choreographed", "in_doubt")], user)  # undo: release, refund
    after = {
        ("choreographed", "outage"): "completed",
        ("choreographed", "refund_fails"): "compensated",
        ("orchestrated", "refund_fails"): "compensated",
        ("orchestrated", "hang"): "completed",
        ("choreographed", "hang"): "completed",
        ("choreographed", "in_doubt"): "compensated",
    }
    _wait(
        lambda: all(statuses()[case] == want for case, want in after.items()),
        60,
        lambda: str({c: statuses()[c] for c in after}),
    )
    for answer in (retried, refunded):
        _wait(
            lambda a=answer: OperatorAction.objects.get(pk=a["id"]).status == "done",
            30,
            lambda a=answer: OperatorAction.objects.get(pk=a["id"]).status,
        )
    paid = ids[("choreographed", "outage")]
    assert Payment.objects.get(order_id=paid).status == "charged"
    assert Order.objects.get(order_id=paid).status == "shipped"
    for flavour in FLAVOURS:
        assert Payment.objects.get(order_id=ids[(flavour, "refund_fails")]).status == "refunded"
    undone = ids[("choreographed", "in_doubt")]
    assert Reservation.objects.get(order_id=undone).status == "released"
    assert Payment.objects.get(order_id=undone).status == "refunded"
    assert Order.objects.get(order_id=undone).status == "cancelled"
    assert Shipment.objects.get(order_id=undone).cancelled  # nothing will be booked later
