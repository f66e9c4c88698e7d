"""Crash at every transition boundary: a worker process is killed there, a new worker finishes.

Each step's action commits its effect exactly once per idempotency key (a
killed attempt rolled back with its transition), and the saga finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from orchestrator.engine import FAULT_EXIT, saga_start
from orchestrator.models import SagaRun
from orchestrator.worker import Worker
from outbox.models import OutboxMessage
from tests.conftest import need
from tests.orchestrator import sagas
from tracking.models import Saga, TelemetryEvent

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]

# Boundaries and how often a 4-step saga passes each on its way (success, and a
# failing variant that compensates 2 steps): every n-th passage is a crash case.
BOUNDARIES = {
    "after-claim": 1,
    "after-action": 4,
    "after-transition-before-commit": 5,
    "after-transition": 5,
}
CASES = [(point, n) for point, hits in BOUNDARIES.items() for n in range(1, hits + 1)]


def _worker_killed_at(point: str, n: int, tmp_path: Path) -> None:
    from tests.e2e.conftest import _database_url

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
        "DATABASE_URL": _database_url(dict(connection.settings_dict)),
        "ORCHESTRATOR_SAGAS": "tests.orchestrator.sagas",
        "SAGAADMIN_ORCHESTRATOR_FAULT": f"{point}@{n}",
        "SAGAADMIN_VAR_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "run_orchestrator", "--drain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == FAULT_EXIT, done.stdout + done.stderr


def _lease_expires() -> None:
    """Time passes: the dead worker's lease runs out."""
    SagaRun.objects.update(lease_until=timezone.now() - timedelta(seconds=1))


def _effects_per_key() -> Counter[tuple[str, str]]:
    return Counter(
        (p["phase"], p["key"])
        for p in (json.loads(m.payload) for m in OutboxMessage.objects.filter(type="test.effect"))
    )


@pytest.mark.parametrize(("point", "n"), CASES)
def test_a_killed_worker_loses_nothing_and_repeats_nothing(
    point: str, n: int, postgres: None, tmp_path: Path
) -> None:
    need(connection.vendor == "postgresql", "worker processes share the database: PostgreSQL")
    saga_start(saga_type="test-order", saga_id="crash-1", data={"order_id": 1})

    _worker_killed_at(point, n, tmp_path)
    _lease_expires()
    Worker().drain()

    run = SagaRun.objects.get(saga_id="crash-1")
    assert run.status == "completed"
    effects = _effects_per_key()
    assert sorted(effects) == sorted(("forward", f"crash-1:{s}:1") for s in sagas.ORDER_STEPS)
    assert set(effects.values()) == {1}, effects
    # the timeline has each step once, in order, and the saga done
    types = list(
        TelemetryEvent.objects.filter(saga_id="crash-1")
        .order_by("sequence")
        .values_list("type", flat=True)
    )
    assert types.count("step.succeeded") == 4 and types[-1] == "saga.completed"
    assert Saga.objects.get(saga_id="crash-1").status == "completed"


@pytest.mark.parametrize("n", range(1, 7))  # 6 transitions: 2 steps, the failure, 2 undos, the end
def test_a_killed_worker_during_compensation_undoes_each_step_once(
    n: int, postgres: None, tmp_path: Path
) -> None:
    need(connection.vendor == "postgresql", "worker processes share the database: PostgreSQL")
    # the subprocess runs the script from the environment: reserve_stock refuses
    os.environ["TEST_SCRIPT"] = json.dumps({"forward:reserve_stock": ["fatal"]})
    try:
        saga_start(saga_type="test-order", saga_id="crash-2")
        _worker_killed_at("after-transition", n, tmp_path)
    finally:
        del os.environ["TEST_SCRIPT"]
    _lease_expires()
    sagas.SCRIPT["forward:reserve_stock"] = ["fatal"]
    Worker().drain()

    run = SagaRun.objects.get(saga_id="crash-2")
    assert run.status == "compensated"
    effects = _effects_per_key()
    assert effects == Counter(
        {
            ("forward", "crash-2:create_order:1"): 1,
            ("forward", "crash-2:charge_payment:1"): 1,
            ("compensation", "crash-2:charge_payment:1"): 1,
            ("compensation", "crash-2:create_order:1"): 1,
        }
    )
