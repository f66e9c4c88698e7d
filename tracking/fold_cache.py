"""The folds of recently reported sagas, kept per process for ingest.

Ingest folds a saga's events into its state. Without this cache every new
event of a known saga costs re-reading all of the saga's stored events and
step rows and folding them again. With it, the fold written at the saga row's
``version`` stays in memory; the next batch for that saga locks the row (as it
always does) and, if the row still has that version and the new events sort
after the folded ones (:meth:`tracking.projection.Fold.extend`), applies just
the new events. The result is the same state by construction (Hypothesis
tests in tests/tracking/test_projection.py); anything else — another process
wrote the saga, the detector or an operator bumped its version, a late event
sorts earlier, the entry was evicted — falls back to reading the store.
docs/decisions/0015-fold-cache.md.

An entry is taken out while a transaction uses it and put back (with the new
version) only after that transaction commits: a rollback leaves no entry, so
nothing unsure is ever kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from django.conf import settings

from tracking.projection import Fold


class FoldCache:
    """Saga id -> (row id, row version, fold at that version); least recently kept
    evicted first. The row id guards against a database emptied and refilled under
    a running process (a new row with the same saga id and version)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[int, int, Fold]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, saga_id: object) -> bool:
        return saga_id in self._entries

    def take(self, saga_id: str, pk: int, version: int) -> Fold | None:
        """Remove and return the fold of ``saga_id`` if kept for row ``pk`` at ``version``."""
        with self._lock:
            entry = self._entries.pop(saga_id, None)
        if entry is None or entry[:2] != (pk, version):
            return None
        return entry[2]

    def keep(self, folds: list[tuple[str, int, int, Fold]]) -> None:
        """Keep each (saga id, row id, version written, fold); call after the commit that
        wrote them."""
        if self.size <= 0:
            return
        with self._lock:
            entries = self._entries
            for saga_id, pk, version, folded in folds:
                entries[saga_id] = (pk, version, folded)
                entries.move_to_end(saga_id)
            while len(entries) > self.size:
                entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


folds = FoldCache(settings.SAGAADMIN["FOLD_CACHE_SAGAS"])
