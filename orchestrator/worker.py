"""Workers: claim due runs with ``FOR UPDATE SKIP LOCKED`` and a lease, advance them.

Any number of workers share the load. A claim sets ``lease_owner``,
``lease_until`` and a new ``lease_token``; every transition renews the lease
and checks the token, so when a worker dies its runs become claimable once
the lease expires, and the dead worker's claim can no longer write.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, connection, connections, transaction
from django.db.models import F, Q
from django.utils import timezone

from orchestrator.engine import (
    Claim,
    StepsKept,
    _lease,
    fault,
    lock_conflict,
    run_advance,
    runs_advance,
)
from orchestrator.models import SagaRun

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def runs_claim(*, owner: str, limit: int, now: datetime | None = None) -> list[Claim]:
    """Claim up to ``limit`` due runs nobody holds (or whose lease expired)."""
    now = now or timezone.now()
    with transaction.atomic():
        pks = list(
            SagaRun.objects.select_for_update(skip_locked=True)
            .filter(next_run_at__lte=now, paused=False)
            .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
            .order_by("next_run_at")
            .values_list("pk", flat=True)[:limit]
        )
        if not pks:
            return []
        SagaRun.objects.filter(pk__in=pks).update(
            lease_owner=owner, lease_until=now + _lease(), lease_token=F("lease_token") + 1
        )
        claims = [  # most overdue first: the order runs are advanced in
            Claim(pk, token, owner)
            for pk, token in SagaRun.objects.filter(pk__in=pks)
            .order_by("next_run_at", "pk")
            .values_list("pk", "lease_token")
        ]
    fault("after-claim")
    return claims


LOCK_RETRY = timedelta(seconds=1)


def run_set_aside(
    claim: Claim,
    exc: BaseException,
    *,
    after: timedelta = timedelta(minutes=1),
    why: str = "error",
) -> None:
    """A run whose transition raised: looked at again ``after`` (a minute), the error
    shown, handed back."""
    when = "in a minute" if after == timedelta(minutes=1) else f"in {after.total_seconds():g} s"
    SagaRun.objects.filter(pk=claim.pk, lease_token=claim.token).update(
        next_run_at=timezone.now() + after,
        waiting=f"{why}, retried {when}: {type(exc).__name__}: {exc}"[:300],
        lease_owner="",
        lease_until=None,
    )


def _connection_lost(exc: BaseException) -> bool:
    """A database error that is the connection's, not a run's: the round is not to blame."""
    if not isinstance(exc, DatabaseError):
        return False
    return (
        isinstance(exc, InterfaceError)
        or connection.connection is None
        or not connection.is_usable()
    )


def claim_release(claim: Claim) -> None:
    claims_release([claim])


def claims_release(claims: list[Claim]) -> None:
    """Give the runs back (one statement): only where the claim still holds."""
    if not claims:
        return
    held = Q(
        *(Q(pk=c.pk, lease_token=c.token, lease_owner=c.owner) for c in claims),
        _connector=Q.OR,
    )
    SagaRun.objects.filter(held).update(lease_owner="", lease_until=None)


class Worker:
    """Claims and advances runs; :meth:`run` loops until ``stop`` is set."""

    def __init__(self, *, owner: str | None = None, batch: int | None = None) -> None:
        cfg = settings.ORCHESTRATOR
        self.owner = owner or worker_name()
        self.batch = batch or cfg["BATCH"]
        self.poll = cfg["POLL_SECONDS"]

    def run_once(self, *, stop: threading.Event | None = None) -> int:
        """Claim one batch and advance its runs until each waits: one transition of
        every due run per transaction (a group commit), round after round. A run
        that waits or ended is handed back in its round. Returns the runs advanced
        (or tried)."""
        transitions = 0
        active = runs_claim(owner=self.owner, limit=self.batch)
        kept: StepsKept = {}
        try:
            while active and not (stop and stop.is_set()):
                transitions += len(active)
                try:
                    active = runs_advance(active, kept=kept)
                except Exception as exc:
                    if _connection_lost(exc):
                        raise
                    log.warning("orchestrator: a round failed (%s); advancing its runs alone", exc)
                    active = self._one_by_one(active, stop)
        finally:
            # stopped, or the connection went: give back what is left (leases expire anyway)
            try:
                claims_release(active)
            except DatabaseError as exc:
                log.warning("orchestrator: could not hand back %d runs: %s", len(active), exc)
        return transitions

    def _one_by_one(self, claims: list[Claim], stop: threading.Event | None) -> list[Claim]:
        """A group failed: advance its runs alone, so only the run at fault (an
        undefined type, a bug, a value the database refuses) is set aside —
        looked at again in a minute."""
        again = []
        for claim in claims:
            if stop and stop.is_set():
                again.append(claim)  # still ours: released by the caller
                continue
            try:
                if run_advance(claim):
                    again.append(claim)
            except Exception as exc:
                if _connection_lost(exc):
                    raise
                if lock_conflict(exc):  # not the run's fault: tried again in a moment
                    log.warning("orchestrator: run %s met a lock conflict: %s", claim.pk, exc)
                    run_set_aside(claim, exc, after=LOCK_RETRY, why="lock conflict")
                    continue
                log.exception("orchestrator: run %s failed; retried in a minute", claim.pk)
                run_set_aside(claim, exc)
        return again

    def drain(self, *, max_rounds: int = 10_000) -> int:
        """Run until nothing is due (tests, ``--once``)."""
        total = 0
        for _ in range(max_rounds):
            done = self.run_once()
            if not done:
                break
            total += done
        return total

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: SIGTERM finishes the transition in hand, then returns."""
        while not stop.is_set():
            try:
                if not self.run_once(stop=stop):
                    stop.wait(self.poll)
            except DatabaseError as exc:
                log.warning("orchestrator: worker round failed, retrying: %s", exc)
                connections.close_all()
                stop.wait(self.poll)


def worker_run(stop: threading.Event, **kwargs: Any) -> None:
    try:
        Worker(**kwargs).run(stop)
    finally:
        connections.close_all()
