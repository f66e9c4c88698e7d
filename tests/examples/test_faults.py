"""Failure injection: the mix, and a flaky network and a skewed clock against Saga Admin."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from examples.order_fulfilment.faults import ORDER_FAULTS, Mix, hits
from examples.order_fulfilment.host import UnreliableReporter
from tracking.keys import service_key_create
from tracking.models import Saga, Step, TelemetryEvent


def test_a_mix_parses_and_names_what_is_wrong() -> None:
    mix = Mix.parse("decline=0.25, hang=0.5,skew=40")
    assert (mix.decline, mix.hang, mix.skew, mix.shortage) == (0.25, 0.5, 40.0, 0.0)
    for text, named in (
        ("explode=0.1", "explode=0.1"),
        ("decline", "decline"),
        ("decline=lots", "decline must be a number"),
        ("hang=1.5", "hang is a chance between 0 and 1"),
        ("decline=0.6,shortage=0.6", "add up to more than 1"),
    ):
        with pytest.raises(ValueError, match=named):
            Mix.parse(text)


def test_each_order_gets_at_most_one_fault_in_proportion() -> None:
    rng = random.Random(7)
    mix = Mix.parse("decline=0.5,hang=0.25")
    drawn = [mix.order_fault(rng) for _ in range(4000)]
    assert set(drawn) == {"decline", "hang", ""}
    assert 1800 < drawn.count("decline") < 2200
    assert 850 < drawn.count("hang") < 1150
    assert {Mix.parse(f"{name}=1").order_fault(rng) for name in ORDER_FAULTS} == set(ORDER_FAULTS)
    assert Mix().order_fault(rng) == ""


def test_a_fault_hits_the_first_try_only() -> None:
    assert hits(["decline"], "decline", first_try=True)
    assert not hits(["decline"], "decline", first_try=False)
    assert not hits([], "decline", first_try=True)
    assert hits(["refund_fails"], "shortage", first_try=True)  # a failed refund needs a shortage
    assert not hits(["refund_fails"], "decline", first_try=True)


@pytest.mark.django_db
def test_the_demo_command_refuses_bad_options_by_name() -> None:
    for args, named in (
        (["--mix", "decline=2"], "--mix"),
        (["--services", "billing"], "--services: billing unknown"),
        (["--flavours", "serverless"], "--flavours"),
        (["--rate", "0"], "--rate"),
        (["--worker", "no"], "in-process transport"),
    ):
        with pytest.raises(CommandError, match=named):
            call_command("demo", *args)


@pytest.mark.django_db(transaction=True)
def test_duplicated_and_reordered_reports_from_a_skewed_clock_give_the_true_timeline(
    live_server: Any,
) -> None:
    """Every report sent twice, every other one held behind the next, the clock 5 min ahead:
    Saga Admin keeps each event once, orders them, and flags the skew."""
    key = service_key_create(service_name="shipping").secret
    ahead = timedelta(minutes=5)
    reporter = UnreliableReporter(
        live_server.url,
        key,
        duplicate=1.0,
        reorder=0.5,
        flush_interval=0.05,
        clock=lambda: datetime.now(UTC) + ahead,
    )
    steps = ("create_order", "charge_payment", "reserve_stock", "create_shipment")
    with reporter, reporter.saga("flaky-1", "order_choreographed") as saga:
        for name in steps:
            with saga.step(name):
                pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = Saga.objects.filter(saga_id="flaky-1").first()
        if row is not None and row.status == "completed" and row.event_count == 10:
            break
        time.sleep(0.1)
    row = Saga.objects.get(saga_id="flaky-1")
    assert row.status == "completed"
    assert TelemetryEvent.objects.filter(saga_id="flaky-1").count() == 10  # no duplicates
    assert "clock_skew" in row.flags
    names = list(
        Step.objects.filter(saga=row).order_by("started_at").values_list("name", flat=True)
    )
    assert names == list(steps)
    assert all(
        s == "succeeded" for s in Step.objects.filter(saga=row).values_list("status", flat=True)
    )


def test_a_saga_started_with_data_a_service_cannot_use_is_refused_not_retried(
    monkeypatch,
) -> None:
    """An orchestrated command whose data lacks a field answers a non-retryable refusal
    naming it (a KeyError was retried until the outbox gave up on the message)."""
    from examples.order_fulfilment import services

    replies: list[dict] = []
    monkeypatch.setattr(services.outbox, "publish", lambda **kw: replies.append(kw["payload"]))
    order = object.__new__(services.OrderService)
    command = {"command_id": "c-1", "saga_id": "fz-1", "epoch": 1, "attempt": 1, "data": {}}
    order._orchestrated("create_order", command)
    [reply] = replies
    assert reply["ok"] is False and reply["command_id"] == "c-1"
    assert reply["error"]["type"] == "BadData"
    assert "'customer'" in reply["error"]["message"]
    assert reply["error"]["retryable"] is False
