"""A Hypothesis state machine over start, step outcomes and operator hooks.

Invariants after every step: compensations run only for steps whose action
committed, in reverse order; a forward action commits at most once per
idempotency key; terminal states stay terminal (a failed compensation may be
retried: that is the one way out, by design); epochs only grow.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from datetime import timedelta

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from orchestrator import hooks
from orchestrator.engine import run_advance, saga_start
from orchestrator.models import TERMINAL_RUN_STATUSES, SagaRun
from orchestrator.worker import claim_release, runs_claim
from outbox.models import OutboxMessage
from tests.orchestrator import sagas

STEPS = ("a", "b", "c")
_ids = itertools.count()
outcomes = st.sampled_from(["ok", "ok", "fail", "fatal"])


class SagaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        sagas.SCRIPT.clear()
        sagas.PLAN.clear()
        self.saga_id = f"hyp-{next(_ids)}"
        saga_start(saga_type="test-hyp", saga_id=self.saga_id)
        self.epoch = 1
        self.terminal: str | None = None

    def run(self) -> SagaRun:
        return SagaRun.objects.get(saga_id=self.saga_id)

    @rule(outcome=outcomes)
    def advance(self, outcome: str) -> None:
        """One transition of whatever is due; an action it calls has ``outcome``."""
        sagas.PLAN[:] = [outcome]
        later = timezone.now() + timedelta(hours=1)
        for claim in runs_claim(owner="hyp", limit=50, now=later):
            if claim.pk == self.run().pk:
                run_advance(claim, now=later)
            claim_release(claim)

    @rule(
        hook=st.sampled_from(
            ["pause", "resume", "terminate", "compensate", "cancel", "skip_step", "retry_step"]
        )
    )
    def operator(self, hook: str) -> None:
        fn = {
            "pause": hooks.run_pause,
            "resume": hooks.run_resume,
            "terminate": hooks.run_terminate,
            "compensate": hooks.run_compensate,
            "cancel": lambda **kw: hooks.run_compensate(cancel=True, **kw),
            "skip_step": hooks.run_skip_step,
            "retry_step": hooks.run_retry_step,
        }[hook]
        with contextlib.suppress(hooks.Refused):
            fn(saga_id=self.saga_id)

    @precondition(lambda self: self.terminal == "compensation_failed")
    @rule()
    def retry_compensation(self) -> None:
        hooks.run_retry_compensation(saga_id=self.saga_id)
        self.terminal = None

    @invariant()
    def terminal_states_stay_terminal(self) -> None:
        status = self.run().status
        if self.terminal is not None:
            assert status == self.terminal
        if status in TERMINAL_RUN_STATUSES:
            self.terminal = status

    @invariant()
    def epochs_only_grow(self) -> None:
        epoch = self.run().epoch
        assert epoch >= self.epoch
        self.epoch = epoch

    @invariant()
    def compensations_undo_committed_steps_in_reverse(self) -> None:
        effects = [
            json.loads(m.payload)
            for m in OutboxMessage.objects.filter(
                type="test.effect", aggregateid=self.saga_id
            ).order_by("seq")
        ]
        done: list[str] = []
        forward_keys: list[str] = []
        last_undone: int | None = None
        for e in effects:
            if e["phase"] == "forward":
                forward_keys.append(e["key"])
                done.append(e["step"])
                last_undone = None
            else:
                assert e["step"] in done, f"undid {e['step']} that never committed: {effects}"
                position = STEPS.index(e["step"])
                if last_undone is not None:
                    assert position < last_undone, f"not in reverse order: {effects}"
                last_undone = position
                done.remove(e["step"])
        assert len(forward_keys) == len(set(forward_keys)), f"an action ran twice: {effects}"


@pytest.mark.django_db
def test_saga_state_machine() -> None:
    machine = SagaMachine.TestCase
    machine.settings = settings(
        max_examples=60,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    machine().runTest()
