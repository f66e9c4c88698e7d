"""Several workers on PostgreSQL share the load and never run one saga's step twice at once."""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import pytest
from django.db import connection, connections

from orchestrator.definitions import RetryPolicy, Step, saga_define
from orchestrator.engine import Claim, run_advance, saga_start
from orchestrator.models import SagaRun
from orchestrator.worker import Worker, claim_release, runs_claim
from outbox.models import OutboxMessage
from tests.conftest import need
from tests.orchestrator import sagas

pytestmark = pytest.mark.django_db(transaction=True)

_running: set[tuple[str, str]] = set()
_overlaps: list[tuple[str, str]] = []
_guard = threading.Lock()


def _watched(ctx: Any) -> Any:
    key = (ctx.saga_id, ctx.step)
    with _guard:
        if key in _running:
            _overlaps.append(key)
        _running.add(key)
    try:
        threading.Event().wait(0.002)  # hold the step a moment: overlaps would show
        return sagas.do(ctx)
    finally:
        with _guard:
            _running.discard(key)


saga_define(
    "test-watched",
    service="order",
    steps=[
        Step(name, action=_watched, retry=RetryPolicy(max_attempts=1)) for name in sagas.ORDER_STEPS
    ],
)


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_share_sagas_and_never_overlap_on_a_step(workers: int, postgres: None) -> None:
    need(connection.vendor == "postgresql", "SKIP LOCKED claims need PostgreSQL")
    _overlaps.clear()
    for i in range(30):
        saga_start(saga_type="test-watched", saga_id=f"w-{i}")
    stop = threading.Event()
    done: Counter[str] = Counter()

    def work(name: str) -> None:
        try:
            worker = Worker(owner=name, batch=3)
            while not stop.is_set():
                n = worker.run_once()
                done[name] += n
                if n == 0 and not SagaRun.objects.exclude(status="completed").exists():
                    return
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(f"worker-{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()

    assert set(SagaRun.objects.values_list("status", flat=True)) == {"completed"}
    assert _overlaps == []
    effects = Counter(
        json.loads(m.payload)["key"] for m in OutboxMessage.objects.filter(type="test.effect")
    )
    assert len(effects) == 30 * 4 and set(effects.values()) == {1}
    assert sum(1 for n in done.values() if n) >= 2  # the load was shared


def test_a_stale_claim_is_fenced_off(postgres: None) -> None:
    saga_start(saga_type="test-order", saga_id="fence-1")
    [old] = runs_claim(owner="a", limit=1)
    # a's lease expires while it is stuck somewhere; b claims the run
    SagaRun.objects.update(lease_until=None)
    [new] = runs_claim(owner="b", limit=1)
    assert new.token == old.token + 1

    assert run_advance(old) is False  # a's transition is refused
    assert sagas.CALLS["forward:create_order"] == 0
    assert run_advance(new) is True
    assert sagas.CALLS["forward:create_order"] == 1
    claim_release(old)  # a's late release does not free b's claim
    assert SagaRun.objects.get().lease_owner == "b"
    assert run_advance(Claim(new.pk, new.token, "a")) is False  # the owner must match too


def test_sigterm_finishes_the_transition_in_hand_and_exits(postgres: None, tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.e2e.conftest import _database_url

    for i in range(150):
        saga_start(saga_type="test-order", saga_id=f"term-{i}")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
        "DATABASE_URL": _database_url(dict(connection.settings_dict)),
        "ORCHESTRATOR_SAGAS": "tests.orchestrator.sagas",
        "SAGAADMIN_VAR_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_orchestrator"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not SagaRun.objects.filter(status="completed").exists():
            assert time.monotonic() < deadline, "the worker completed nothing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert b"orchestrator: stopped" in out
    assert not SagaRun.objects.exclude(lease_owner="").exists()  # every claim released
    unfinished = SagaRun.objects.exclude(status="completed").count()
    assert unfinished > 0  # it stopped early, not after all the work

    Worker().drain()  # another worker finishes the rest
    assert set(SagaRun.objects.values_list("status", flat=True)) == {"completed"}
    effects = Counter(
        json.loads(m.payload)["key"] for m in OutboxMessage.objects.filter(type="test.effect")
    )
    assert len(effects) == 150 * 4 and set(effects.values()) == {1}
