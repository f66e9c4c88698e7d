"""The garbage collector settings of Saga Admin's long-running processes (ADR 0017).

CPython's cyclic collector runs a young-generation pass every 2,000 net new
container objects and now and then a full pass over every object in the
process. An ingest flush of a 500-event batch creates far more than 2,000
objects that live for its few milliseconds, so with the defaults the collector
ran hundreds of times a minute, promoted those short-lived objects to the old
generations and rescanned the ~200,000 objects Django, DRF and the app leave
after start-up on every full pass (~125 ms each): 12-15 % of an ingest
worker's CPU went to collections that freed almost nothing (reference counting
frees these objects anyway).

:func:`gc_tune` runs once a process has loaded its code: it moves every object
alive at that point out of the collector's view (``gc.freeze()``; they live as
long as the process) and raises the young-generation threshold, so a
collection runs after tens of thousands of net allocations instead of two
thousand. Cyclic garbage is still collected, just in bigger, rarer passes.
"""

from __future__ import annotations

import gc
import logging

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

log = logging.getLogger(__name__)


def threshold_parse(text: str, name: str = "SAGAADMIN_GC_THRESHOLD") -> tuple[int, int, int]:
    """``"50000,20,10"`` → ``(50000, 20, 10)``; anything else is refused naming ``name``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = tuple(int(p) for p in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or any(n < 0 for n in numbers):
        raise ImproperlyConfigured(
            f"{name} must be three non-negative integers separated by commas "
            f"(gc.set_threshold's arguments, e.g. '50000,20,10'), not {text!r}"
        )
    return numbers  # type: ignore[return-value]


def gc_tune() -> None:
    """Apply ``SAGAADMIN["GC_THRESHOLD"]`` and, when ``SAGAADMIN["GC_FREEZE"]``, freeze
    the objects alive now. Call it once, after the process has imported its code."""
    threshold = settings.SAGAADMIN["GC_THRESHOLD"]
    if threshold is not None:
        gc.set_threshold(*threshold)
    if settings.SAGAADMIN["GC_FREEZE"]:
        gc.collect()  # what is garbage now is not frozen with the rest
        gc.freeze()
    log.debug("gc: threshold %s, %d objects frozen", gc.get_threshold(), gc.get_freeze_count())
