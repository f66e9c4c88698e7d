"""The garbage collector settings of the server and worker processes (ADR 0017)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from sagaadmin.gc_tuning import gc_tune, threshold_parse

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """Give the test process its collector back as it was."""
    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if frozen == 0:
            gc.unfreeze()


def test_threshold_parse_reads_three_numbers() -> None:
    assert threshold_parse("50000,20,10") == (50000, 20, 10)
    assert threshold_parse(" 700 , 10, 0 ") == (700, 10, 0)


@pytest.mark.parametrize("text", ["50000,20", "a,b,c", "1,2,3,4", "-1,10,10", "1.5,10,10"])
def test_threshold_parse_refuses_anything_else_naming_the_variable(text: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="SAGAADMIN_GC_THRESHOLD") as caught:
        threshold_parse(text)
    assert repr(text) in str(caught.value)


def _sagaadmin(**changes: object) -> dict[str, object]:
    from django.conf import settings

    return {**settings.SAGAADMIN, **changes}


def test_gc_tune_sets_the_threshold_and_freezes_what_is_alive(gc_restored: None) -> None:
    gc.unfreeze()
    alive = [["made before"]]
    with override_settings(SAGAADMIN=_sagaadmin(GC_THRESHOLD=(12345, 17, 9), GC_FREEZE=True)):
        gc_tune()
    assert gc.get_threshold() == (12345, 17, 9)
    assert gc.get_freeze_count() > 0
    # the collector no longer scans what was alive, and still scans what comes after
    assert not any(o is alive for o in gc.get_objects())
    after = [["made after"]]
    assert any(o is after for o in gc.get_objects())


def test_gc_tune_leaves_the_collector_alone_when_turned_off(gc_restored: None) -> None:
    gc.unfreeze()
    gc.set_threshold(2000, 10, 10)
    with override_settings(SAGAADMIN=_sagaadmin(GC_THRESHOLD=None, GC_FREEZE=False)):
        gc_tune()
    assert gc.get_threshold() == (2000, 10, 10)
    assert gc.get_freeze_count() == 0


def _settings_load(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.SAGAADMIN['GC_THRESHOLD'], settings.SAGAADMIN['GC_FREEZE'])"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("SAGAADMIN_GC_")},
            "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_production_settings_tune_by_default_and_read_the_environment() -> None:
    unset = _settings_load({})
    assert unset.returncode == 0, unset.stderr
    assert unset.stdout.strip() == "(50000, 20, 10) True"
    chosen = _settings_load({"SAGAADMIN_GC_THRESHOLD": "700,10,10", "SAGAADMIN_GC_FREEZE": "0"})
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == "(700, 10, 10) False"
    python_s = _settings_load({"SAGAADMIN_GC_THRESHOLD": ""})  # empty: Python's thresholds
    assert python_s.returncode == 0, python_s.stderr
    assert python_s.stdout.strip() == "None True"


def test_a_bad_threshold_stops_start_up_naming_the_variable() -> None:
    ran = _settings_load({"SAGAADMIN_GC_THRESHOLD": "lots"})
    assert ran.returncode != 0
    assert "SAGAADMIN_GC_THRESHOLD must be three non-negative integers" in ran.stderr
    assert "'lots'" in ran.stderr
