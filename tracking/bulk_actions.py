"""Bulk actions: one operator action over every saga a list filter matches.

:func:`bulk_preview` counts the matches and shows a sample; :func:`bulk_start`
fixes the set (one ``BulkItem`` per saga, so sagas arriving later are not
swept in) and returns at once; the worker (``run_worker``) dispatches the
items with :func:`bulk_work` at the job's rate, each through
:func:`tracking.actions.saga_action_run` — the same checks, dispatch and
audit as a single action, with a request id per (job, saga) so a worker
restart never dispatches one twice. :func:`bulk_cancel` stops the rest.
Progress is the job row (total, succeeded, failed) and per-saga results.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connections, transaction
from django.db.models import F
from django.utils import timezone

from tracking.actions import ACTIONS, REASON_MAX, ActionError, ActionInput, saga_action_run
from tracking.models import BulkItem, BulkJob
from tracking.selectors import SagaFilter, saga_queryset

log = logging.getLogger(__name__)
SAMPLE = 10


@dataclass(frozen=True, slots=True)
class Preview:
    count: int
    sample: list[str]  # saga ids


def bulk_preview(*, filters: dict[str, str]) -> Preview:
    """How many sagas the filter matches now, and a few of them. Raises InvalidFilter."""
    qs = saga_queryset(filters=SagaFilter.strict(filters))
    return Preview(
        count=qs.count(),
        sample=list(qs.order_by("-started_at", "-id").values_list("saga_id", flat=True)[:SAMPLE]),
    )


def bulk_start(
    *,
    action: str,
    filters: dict[str, str],
    reason: str,
    user: Any,
    expected_count: int | None = None,
    rate: float | None = None,
) -> BulkJob:
    """Fix the matching sagas and queue the job (the worker runs it).

    ``expected_count``: the count the operator confirmed in the preview; a
    different count now is refused (409), so nobody acts on more than they saw.
    Raises :class:`ActionError` or ``InvalidFilter``.
    """
    if action not in ACTIONS:
        raise ActionError(404, "action", f"no action {action!r}; one of {', '.join(ACTIONS)}")
    spec = ACTIONS[action]
    if not user.has_perm(spec.permission):
        raise ActionError(403, "role", f"your role may not {spec.label.lower()}")
    reason = (reason or "").strip()
    if not reason or len(reason) > REASON_MAX:
        raise ActionError(400, "reason", f"say why (1 to {REASON_MAX} characters)")
    most = settings.SAGAADMIN["BULK_MAX_SAGAS"]
    ids = list(
        saga_queryset(filters=SagaFilter.strict(filters))
        .order_by("-started_at", "-id")
        .values_list("saga_id", flat=True)[: most + 1]
    )
    if len(ids) > most:
        raise ActionError(400, "filters", f"matches over {most} sagas: narrow the filter")
    if not ids:
        raise ActionError(400, "filters", "matches no saga")
    if expected_count is not None and expected_count != len(ids):
        raise ActionError(
            409,
            "expected_count",
            f"the filter matches {len(ids)} sagas now, not {expected_count}: preview again",
            current_count=len(ids),
        )
    above = settings.SAGAADMIN["TWO_PERSON_BULK_ABOVE"]
    with transaction.atomic():
        job = BulkJob.objects.create(
            status="awaiting_approval" if above and len(ids) > above else "running",
            action=action,
            filters=filters,
            reason=reason,
            actor=user.get_username(),
            rate=settings.SAGAADMIN["BULK_RATE_PER_SECOND"] if rate is None else rate,
            total=len(ids),
        )
        BulkItem.objects.bulk_create(BulkItem(job=job, saga_id=s) for s in ids)
    return job


def _permission(job: BulkJob) -> str:
    action = ACTIONS.get(job.action)
    return action.permission if action else "tracking.terminate_saga"  # unknown: admins only


def bulk_approve(*, job_id: int, user: Any) -> BulkJob:
    """The two-person rule for big jobs: a second operator lets it run."""
    with transaction.atomic():
        job = BulkJob.objects.select_for_update().get(pk=job_id)
        if job.status != "awaiting_approval":
            raise ActionError(409, "status", f"the job is {job.status}, not awaiting approval")
        if job.actor == user.get_username():
            raise ActionError(403, "approver", "a second person must approve, not the requester")
        if not user.has_perm(_permission(job)):
            raise ActionError(403, "role", "your role may not run this job")
        job.status = "running"
        job.approved_by = user.get_username()
        job.save(update_fields=["status", "approved_by"])
    return job


def bulk_cancel(*, job_id: int, user: Any) -> BulkJob:
    """Stop a running job: items not dispatched yet are marked cancelled."""
    with transaction.atomic():
        job = BulkJob.objects.select_for_update().get(pk=job_id)
        if not user.has_perm(_permission(job)):
            raise ActionError(403, "role", "your role may not cancel this job")
        if job.status not in ("running", "awaiting_approval"):
            raise ActionError(409, "status", f"the job is {job.status} already")
        job.items.filter(status="pending").update(status="cancelled")
        job.status = "cancelled"
        job.finished_at = timezone.now()
        job.save(update_fields=["status", "finished_at"])
    return job


def bulk_work(*, limit: int = 50) -> int:
    """Dispatch up to ``limit`` pending items of running jobs, each job at its rate.

    Returns the items processed. Each item: the job row is locked, so a
    cancel waits for the item in hand and a second worker skips the job.
    """
    done = 0
    for job_id in BulkJob.objects.filter(status="running").values_list("pk", flat=True):
        done += _job_work(job_id, limit=limit - done)
        if done >= limit:
            break
    return done


def _job_work(job_id: int, *, limit: int) -> int:
    done = 0
    while done < limit:
        started = time.monotonic()
        with transaction.atomic():
            job = BulkJob.objects.select_for_update(skip_locked=True).filter(pk=job_id).first()
            if job is None or job.status != "running":
                return done
            item = job.items.filter(status="pending").order_by("pk").first()
            if item is None:
                job.status, job.finished_at = "done", timezone.now()
                job.save(update_fields=["status", "finished_at"])
                return done
            _item_run(job, item)
        done += 1
        pause = 1.0 / job.rate - (time.monotonic() - started) if job.rate > 0 else 0
        if pause > 0:
            time.sleep(pause)  # the job's rate; never inside a transaction
    return done


def _item_run(job: BulkJob, item: BulkItem) -> None:
    user = get_user_model().objects.filter(username=job.actor).first()
    try:
        if user is None:
            raise ActionError(403, "role", f"the job's user {job.actor} no longer exists")
        answer = _action_run(
            ActionInput(
                action=job.action,
                saga_id=item.saga_id,
                actor=user,
                reason=f"{job.reason} (bulk job {job.pk})",
                expected_version=None,
                request_id=f"bulk-{job.pk}-{item.pk}",
            )
        )
        item.status, item.result = "done", answer
        BulkJob.objects.filter(pk=job.pk).update(succeeded=F("succeeded") + 1)
    except ActionError as exc:
        item.status = "failed"
        item.result = {"status": exc.status, "field": exc.field, "message": exc.message}
        BulkJob.objects.filter(pk=job.pk).update(failed=F("failed") + 1)
    except Exception as exc:  # one saga's error is its result, not the job's end
        log.exception("bulk job %s: saga %s failed", job.pk, item.saga_id)
        item.status = "failed"
        item.result = {"status": 500, "field": "", "message": f"{type(exc).__name__}: {exc}"}
        BulkJob.objects.filter(pk=job.pk).update(failed=F("failed") + 1)
    item.save(update_fields=["status", "result"])


def _action_run(inp: ActionInput) -> dict[str, Any]:
    """One item's action in a savepoint: an unexpected error is rolled back alone (the
    job's transaction stays usable); a refusal keeps its audit row."""
    savepoint = transaction.savepoint()
    try:
        answer = saga_action_run(inp)
    except ActionError:
        transaction.savepoint_commit(savepoint)
        raise
    except Exception:
        transaction.savepoint_rollback(savepoint)
        raise
    transaction.savepoint_commit(savepoint)
    return answer


def bulk_loop(stop: threading.Event, *, poll: float = 1.0) -> None:
    """``run_worker``'s thread: work bulk jobs until ``stop``."""
    while not stop.is_set():
        try:
            if not bulk_work():
                stop.wait(poll)
        except DatabaseError as exc:
            log.warning("bulk actions: round failed, retrying: %s", exc)
            connections.close_all()
            stop.wait(poll)
        except Exception:
            log.exception("bulk actions: round failed, retrying")
            stop.wait(poll)
