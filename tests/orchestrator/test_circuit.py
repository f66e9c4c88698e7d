"""The circuit breaker per target service: opens, makes sagas wait, probes, closes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from orchestrator.engine import run_advance, saga_start, step_reply
from orchestrator.models import Circuit, SagaRun, StepRun
from orchestrator.worker import claim_release, runs_claim

pytestmark = pytest.mark.django_db
DOWN = {"type": "ServiceUnavailable", "message": "503", "retryable": True}


@pytest.fixture(autouse=True)
def _breaker(settings: Any) -> None:
    settings.ORCHESTRATOR = {
        **settings.ORCHESTRATOR,
        "CIRCUIT_FAILURES": 2,
        "CIRCUIT_OPEN_SECONDS": 60,
    }


def advance(saga_id: str, now: datetime) -> None:
    """Advance one saga at ``now`` until it waits (it must be due)."""
    claims = runs_claim(owner="w", limit=100, now=now)
    mine = [c for c in claims if SagaRun.objects.get(pk=c.pk).saga_id == saga_id]
    assert mine, f"{saga_id} is not due at {now}"
    for claim in claims:
        if claim in mine:
            while run_advance(claim, now=now):
                pass
        claim_release(claim)


def step(saga_id: str) -> StepRun:
    return StepRun.objects.get(run__saga_id=saga_id)


def test_the_circuit_opens_sagas_wait_without_burning_attempts_a_probe_closes_it() -> None:
    saga_start(saga_type="test-breaker", saga_id="cb-1")
    saga_start(saga_type="test-breaker", saga_id="cb-2")
    t = timezone.now()
    advance("cb-1", t)
    step_reply(command_id=step("cb-1").command_id, ok=False, error=DOWN, now=t)
    assert Circuit.objects.get(service="payment").state == "closed"  # 1 of 2
    advance("cb-1", t)
    step_reply(command_id=step("cb-1").command_id, ok=False, error=DOWN, now=t)
    circuit = Circuit.objects.get(service="payment")
    assert (circuit.state, circuit.failures) == ("open", 2)
    assert circuit.retry_at == t + timedelta(seconds=60)

    # open: both sagas wait, no command goes out, no attempt is used up
    advance("cb-1", t + timedelta(seconds=1))
    advance("cb-2", t + timedelta(seconds=1))
    for saga_id, attempts in (("cb-1", 2), ("cb-2", 0)):
        run = SagaRun.objects.get(saga_id=saga_id)
        assert run.waiting.startswith("waiting: circuit open for payment until")
        assert run.next_run_at == circuit.retry_at
        assert step(saga_id).attempt == attempts

    # after the open time: one probe goes, the other saga still waits
    later = t + timedelta(seconds=61)
    advance("cb-2", later)
    advance("cb-1", later)
    assert Circuit.objects.get().state == "half_open"
    assert step("cb-2").attempt == 1 and step("cb-2").status == "running"  # the probe
    assert step("cb-1").attempt == 2 and step("cb-1").status == "failed"
    assert SagaRun.objects.get(saga_id="cb-1").waiting.startswith("waiting: circuit open")

    # the probe succeeds: closed, and the waiting saga goes on
    step_reply(command_id=step("cb-2").command_id, ok=True, now=later)
    assert (Circuit.objects.get().state, Circuit.objects.get().failures) == ("closed", 0)
    assert SagaRun.objects.get(saga_id="cb-2").status == "running"
    advance("cb-1", later + timedelta(seconds=61))
    assert step("cb-1").attempt == 3 and step("cb-1").status == "running"


def test_a_failed_probe_opens_the_circuit_again() -> None:
    saga_start(saga_type="test-breaker", saga_id="cb-3")
    t = timezone.now()
    for _ in range(2):
        advance("cb-3", t)
        step_reply(command_id=step("cb-3").command_id, ok=False, error=DOWN, now=t)
    probe_at = t + timedelta(seconds=61)
    advance("cb-3", probe_at)
    assert Circuit.objects.get().state == "half_open"
    step_reply(command_id=step("cb-3").command_id, ok=False, error=DOWN, now=probe_at)
    circuit = Circuit.objects.get()
    assert circuit.state == "open" and circuit.retry_at == probe_at + timedelta(seconds=60)
