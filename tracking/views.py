"""Dashboard pages: server-rendered templates, htmx fragments, live refresh."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import Resolver404, resolve, reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from orchestrator.circuit import circuits_list
from orchestrator.definitions import Step as OrchestratorStep
from orchestrator.definitions import UnknownSagaType, definitions_list
from orchestrator.engine import StartRefused
from outbox.maintenance import dead_requeue, outbox_stats
from outbox.models import OutboxMessage
from outbox.models import Status as OutboxStatus
from tracking.actions import (
    ACTIONS,
    REASON_MAX,
    ActionError,
    ActionInput,
    action_approve,
    action_reject,
    actions_available,
    saga_action_run,
)
from tracking.api.orchestrator import orchestrated_saga_start, run_state_get, runs_unfinished_list
from tracking.audit import AUDIT_OUTCOMES, EXPORTS, AuditFilter, audit_export, audit_list
from tracking.bulk_actions import bulk_approve, bulk_cancel, bulk_preview, bulk_start
from tracking.fragments import (
    SAGA_ROW_FIELDS,
    event_rows_html,
    incident_badges_html,
    saga_detail_url,
    saga_rows_html,
    waterfall_html,
)
from tracking.incidents import (
    AUDIT_ACKNOWLEDGE,
    AUDIT_RESOLVE,
    NOTE_MAX,
    IncidentRefused,
    incident_acknowledge,
    incident_resolve,
)
from tracking.keys import service_key_create, service_key_revoke
from tracking.models import (
    AuditEntry,
    BulkItem,
    BulkJob,
    Incident,
    IncidentKind,
    OperatorAction,
    Saga,
    SagaStatus,
    SagaType,
    Service,
    ServiceKey,
    StepStatus,
    TelemetryEvent,
)
from tracking.overview import WINDOWS, overview_get
from tracking.policy import (
    MAX_THRESHOLD_SECONDS,
    InvalidThreshold,
    Learned,
    Policy,
    policy_load,
    saga_type_update,
)
from tracking.roles import (
    can_act,
    can_edit_thresholds,
    can_manage_keys,
    can_start_sagas,
    can_view,
)
from tracking.selectors import (
    INCIDENT_FLAGS,
    INCIDENT_STATES,
    SAGA_FLAGS,
    InvalidFilter,
    SagaFilter,
    incident_counts,
    incident_list,
    saga_events_list,
    saga_get,
    saga_list,
)
from tracking.timeline import saga_timeline_build

View = Callable[..., HttpResponseBase]
SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
# The saga list's flag filter: the projection's flags, then the kinds of open incidents
# (the detector mirrors those in Saga.open_incidents; "anomaly" is a flag already).
FLAGS = (("Flag", SAGA_FLAGS), ("Open incident", INCIDENT_FLAGS))  # <optgroup>s


def viewer_required(view: View) -> View:
    """Logged in, with at least the viewer role."""

    @login_required
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not can_view(request.user):
            raise PermissionDenied("Your account has no role yet: ask an admin to add you to one.")
        return view(request, *args, **kwargs)

    return wrapped


def _unresolved_incidents() -> int:
    return sum(incident_counts().values())


def _page(
    request: HttpRequest, template: str, context: dict[str, Any], *, status: int = 200
) -> HttpResponse:
    """``render`` plus what ``base.html`` shows on every page.

    The navigation's count of unresolved incidents is a callable: the template
    runs its query only when it renders the header, never for an htmx fragment.
    """
    context = {"incidents_unresolved": _unresolved_incidents, **context}
    return render(request, template, context, status=status)


def _filter_params(query: QueryDict) -> dict[str, str]:
    """Form fields -> selector parameters (the free-text ``attr`` becomes ``attr.<key>``)."""
    params: dict[str, str] = {
        k: str(v) for k, v in query.items() if v and k not in ("attr", "cursor", "sort")
    }
    for pair in query.getlist("attr"):
        key, sep, value = pair.partition("=")
        if pair and not sep:
            raise InvalidFilter("attr", "write attributes as key=value, e.g. order_id=42")
        if key:
            params[f"attr.{key.strip()}"] = value.strip()
    for name in ("started_after", "started_before"):  # <input type=datetime-local> is UTC here
        if name in params and len(params[name]) == 16:
            params[name] += ":00+00:00"
    return params


@require_GET
@viewer_required
def saga_list_page(request: HttpRequest) -> HttpResponse:
    error = None
    sort = request.GET.get("sort", "-started_at")
    page = None
    try:
        filters = SagaFilter.from_params(_filter_params(request.GET))
        page = saga_list(
            filters=filters,
            sort=sort,
            cursor=request.GET.get("cursor") or None,
            fields=SAGA_ROW_FIELDS,
        )
    except InvalidFilter as exc:
        error = exc
    next_query = None
    if page and page.next_cursor:
        query = request.GET.copy()
        query["cursor"] = page.next_cursor
        next_query = query.urlencode()
    # a sortable column header toggles between descending and ascending
    sort_links = {}
    for column in ("started_at", "last_event_at"):
        query = request.GET.copy()
        query.pop("cursor", None)
        query["sort"] = column if sort == f"-{column}" else f"-{column}"
        sort_links[column] = query.urlencode()
    now = timezone.now()
    context = {
        "rows": saga_rows_html(page.sagas if page else [], now),
        "error": error,
        "next_query": next_query,
        "is_first_page": not request.GET.get("cursor"),
        "first_query": _without(request.GET, "cursor"),
        "sort": sort,
        "sort_links": sort_links,
        "statuses": SagaStatus.values,
        "flag_groups": FLAGS,
        "q": request.GET,
        "bulk_actions": _bulk_actions_for(request.user),
        "bulk_filter": _bulk_filter_pairs(_bulk_filter_query(request.GET)),
        "reason_max": REASON_MAX,
        "now": now,
        "nav": "sagas",
    }
    template = "tracking/saga_list.html"
    if request.headers.get("HX-Request") and request.headers.get("HX-Target") == "saga-table":
        template += "#saga-table"
    return _page(request, template, context, status=400 if error else 200)


def _without(query: QueryDict, *names: str) -> str:
    copy = query.copy()
    for name in names:
        copy.pop(name, None)
    return copy.urlencode()


@require_GET
@viewer_required
def saga_rows_fragment(request: HttpRequest) -> HttpResponse:
    """Fresh rows for the given saga ids (live refresh of the list)."""
    ids = [i for i in request.GET.getlist("id") if i][:200]
    sagas = [s for s in (saga_get(saga_id=i) for i in ids) if s is not None]
    return render(
        request,
        "tracking/saga_list.html#saga-rows-oob",
        {"rows": saga_rows_html(sagas, timezone.now())},
    )


@require_GET
@viewer_required
def saga_news_view(request: HttpRequest) -> HttpResponse:
    """Which of the changed sagas ``id`` (not on the open list page) the first page of this
    filter and sort shows now: the list's "N newer sagas" banner counts only those, so a
    change to a saga the filter excludes, or to an old saga that stays off the first
    page, never promises something "show the latest" would not show."""
    ids = {i for i in request.GET.getlist("id") if i}
    query = request.GET.copy()
    query.pop("id", None)
    try:
        page = saga_list(
            filters=SagaFilter.from_params(_filter_params(query)),
            sort=query.get("sort", "-started_at"),
            fields=("saga_id",),
        )
    except InvalidFilter as exc:
        return JsonResponse(
            {"ids": [], "error": {"field": exc.field, "message": exc.message}}, status=400
        )
    return JsonResponse({"ids": [s.saga_id for s in page.sagas if s.saga_id in ids]})


# The detail page shows this many events, all of them with ?events=all.
EVENTS_FIRST = 50
# ... and this many of the saga's incidents, the rest on the incidents page.
INCIDENTS_ON_DETAIL = 20


@require_GET
@viewer_required
def saga_detail_page(request: HttpRequest, saga_id: str) -> HttpResponse:
    template = "tracking/saga_detail.html"
    if request.headers.get("HX-Request"):
        template += "#saga-body"
    return _page(request, template, _saga_detail_context(request, saga_id, request.GET))


def trace_links(trace_ids: list[str]) -> list[tuple[str, str]]:
    """(trace id, its URL in the tracing UI or "") per id, from ``SAGAADMIN_TRACE_URL``."""
    template = settings.SAGAADMIN["TRACE_URL"]
    return [(t, template.replace("{trace_id}", t) if template else "") for t in trace_ids]


def _error_recovered(saga: Saga) -> bool:
    """The saga's last error is behind it: the saga completed, or it still runs forward
    and the step that failed has succeeded since (a retry worked). A saga that failed,
    compensates or ended otherwise has not recovered, whatever its steps say."""
    if saga.status == SagaStatus.COMPLETED:
        return True
    if saga.status != SagaStatus.RUNNING:
        return False
    failed = (saga.last_error or {}).get("step")
    step = next((s for s in saga.steps.all() if s.name == failed), None)
    return step is not None and step.status == StepStatus.SUCCEEDED and step.last_error is None


def _saga_detail_context(
    request: HttpRequest, saga_id: str, query: QueryDict, **extra: Any
) -> dict[str, Any]:
    saga = saga_get(saga_id=saga_id)
    if saga is None:
        raise Http404(f"No saga with id '{saga_id}'.")
    events = saga_events_list(saga_id=saga_id)
    shown = events if query.get("events") == "all" else events[:EVENTS_FIRST]
    now = timezone.now()
    timeline = saga_timeline_build(saga=saga, events=events, now=now)
    incidents = incident_list(state="all", saga_id=saga_id, limit=INCIDENTS_ON_DETAIL)
    back = saga_detail_url(saga_id) + (f"?{query.urlencode()}" if query else "")
    run = run_state_get(saga_id=saga_id)
    return {
        "saga": saga,
        "error_recovered": _error_recovered(saga),
        "trace_links": trace_links(saga.trace_ids),
        "incident_badges": incident_badges_html(saga.open_incidents),
        "incidents": incidents.incidents,
        "incidents_more": incidents.next_cursor is not None,
        "can_act": can_act(request.user),
        "back": back,
        "note_max": NOTE_MAX,
        "event_rows": event_rows_html(shown, 1, _skew_ms()),
        "events_more": len(events) - len(shown),
        "timeline": timeline,
        "waterfall": waterfall_html(timeline),
        "run": run,
        "actions": _action_forms(request, saga, run, extra.get("action_refused")),
        "operator_actions": OperatorAction.objects.filter(saga_id=saga_id).order_by("-pk")[
            :ACTIONS_ON_DETAIL
        ],
        "audit_entries": AuditEntry.objects.filter(saga_id=saga_id).order_by("-at", "-pk")[
            :ACTIONS_ON_DETAIL
        ],
        "actions_more": OperatorAction.objects.filter(saga_id=saga_id).count() > ACTIONS_ON_DETAIL,
        # the waiting actions (two-person rule) this user may approve or reject
        "approvable": {name for name, _ in _bulk_actions_for(request.user)},
        "reason_max": REASON_MAX,
        "now": now,
        "nav": "sagas",
        **extra,
    }


def _skew_ms() -> int:
    from django.conf import settings

    return int(settings.SAGAADMIN["CLOCK_SKEW_SECONDS"] * 1000)


# -- operator actions on a saga's page -------------------------------------------

# The detail page lists this many of the saga's operator actions and audit entries.
ACTIONS_ON_DETAIL = 20
# Fields the action dialog has: a refusal naming one shows at it, any other at the form's top.
ACTION_FORM_FIELDS = ("reason", "step", "data")


@dataclass(frozen=True, slots=True)
class ActionForm:
    """One action's button and dialog on a saga's page (from ``actions_available``)."""

    name: str
    label: str
    allowed: bool
    why_not: str
    needs_step: bool
    step: str  # prefilled (or what was typed, after a refusal)
    edits_data: bool  # rerun: the data textarea
    may_edit_data: bool  # admins only
    data: str  # the textarea's text
    request_id: str  # fresh per render: a double submit returns the first answer
    reason: str  # what was typed, after a refusal
    error_field: str  # after a refusal: the field it names ("" when another action's)
    error: str
    open: bool  # the dialog opens at load (a refusal of this action)

    @property
    def error_at_top(self) -> str:
        """A refusal naming no field of the dialog (version, status, role, ...)."""
        return self.error if self.error_field not in ACTION_FORM_FIELDS else ""


def _action_forms(
    request: HttpRequest, saga: Any, run: Any, refused: dict[str, Any] | None
) -> list[ActionForm]:
    may_edit_data = request.user.has_perm("tracking.terminate_saga")
    run_data = json.dumps(run.data, indent=2, sort_keys=True) if run is not None else ""
    forms = []
    for a in actions_available(saga_id=saga.saga_id, user=request.user):
        mine = refused is not None and refused["action"] == a.name
        edits_data = a.name == "rerun"
        forms.append(
            ActionForm(
                name=a.name,
                label=a.label,
                allowed=a.allowed,
                why_not=a.reason,
                needs_step=a.needs_step,
                step=refused["step"] if mine and refused else a.step,
                edits_data=edits_data,
                may_edit_data=may_edit_data,
                data=refused["data"] if mine and refused else (run_data if edits_data else ""),
                request_id=uuid.uuid4().hex,
                reason=refused["reason"] if mine and refused else "",
                error_field=refused["field"] if mine and refused else "",
                error=refused["message"] if mine and refused else "",
                open=mine,
            )
        )
    return forms


@require_POST
@viewer_required
def saga_action_view(request: HttpRequest, saga_id: str, action: str) -> HttpResponse:
    """Run an operator action from the saga's page, then back to it with a flash message.

    The role, version and state checks are ``saga_action_run``'s (a viewer's POST is
    refused and audited there). A refusal renders the saga's page again with the
    dialog open and the message at the field it names, with the refusal's status.
    """
    posted = {
        "action": action,
        "reason": request.POST.get("reason", ""),
        "step": request.POST.get("step", "").strip(),
        "data": request.POST.get("data", ""),
    }
    try:
        data = _action_data(saga_id, action, posted["data"])
        version_text = request.POST.get("expected_version", "").strip()
        try:
            expected_version = int(version_text)
        except ValueError:
            raise ActionError(
                400, "version", f"not a saga version: {version_text!r} (reload the page)"
            ) from None
        answer = saga_action_run(
            ActionInput(
                action=action,
                saga_id=saga_id,
                actor=request.user,
                reason=posted["reason"],
                expected_version=expected_version,
                step=posted["step"],
                data=data,
                request_id=request.POST.get("request_id", "").strip() or None,
            )
        )
    except ActionError as exc:
        refused = {**posted, "field": exc.field, "message": exc.message}
        refused["label"] = ACTIONS[action].label if action in ACTIONS else action
        context = _saga_detail_context(request, saga_id, QueryDict(), action_refused=refused)
        return _page(request, "tracking/saga_detail.html", context, status=exc.status)
    label = ACTIONS[action].label
    how = " by the orchestrator" if answer["orchestrated"] else ""
    again = " (already submitted: this is the first answer)" if answer.get("resubmitted") else ""
    messages.success(request, f"{label} on {saga_id}: {answer['status']}{how}.{again}")
    return redirect(saga_detail_url(saga_id))


def _action_data(saga_id: str, action: str, text: str) -> dict[str, Any] | None:
    """Rerun's edited data: None when empty or unchanged (no edit, so no admin needed)."""
    if action != "rerun" or not text.strip():
        return None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ActionError(
            400, "data", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:
        raise ActionError(400, "data", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ActionError(400, "data", "the saga's data is a JSON object ({...})")
    run = run_state_get(saga_id=saga_id)
    if run is not None and data == run.data:
        return None
    return data


# -- waiting actions (the two-person rule) -----------------------------------------


@require_POST
@viewer_required
def operator_action_approve_view(request: HttpRequest, action_id: int) -> HttpResponse:
    return _operator_action_decide(request, action_id, approve=True)


@require_POST
@viewer_required
def operator_action_reject_view(request: HttpRequest, action_id: int) -> HttpResponse:
    return _operator_action_decide(request, action_id, approve=False)


def _operator_action_decide(request: HttpRequest, action_id: int, *, approve: bool) -> HttpResponse:
    """A second operator approves (it is dispatched now) or rejects a waiting action.

    Back to the saga's page with a flash message; a refusal (the requester, a role
    that may not, no longer waiting, the saga's state) is the message.
    """
    if not can_act(request.user):
        raise PermissionDenied("Only operators and admins approve or reject actions.")
    record = OperatorAction.objects.filter(pk=action_id).first()
    if record is None:
        raise Http404(f"No operator action {action_id}.")
    label = ACTIONS[record.action].label if record.action in ACTIONS else record.action
    verb = "approved" if approve else "rejected"
    try:
        if approve:
            answer = action_approve(action_id=action_id, user=request.user)
        else:
            note = request.POST.get("note", "").strip()
            answer = action_reject(action_id=action_id, user=request.user, note=note)
    except ActionError as exc:
        messages.error(request, f"{label} on {record.saga_id} was not {verb}: {exc.message}.")
    else:
        messages.success(
            request, f"{label} on {record.saga_id} {verb} (by {record.actor}): {answer['status']}."
        )
    return redirect(saga_detail_url(record.saga_id))


# -- bulk actions ------------------------------------------------------------------

# The saga list's filter fields a bulk action carries (not the list's cursor or sort).
BULK_FILTER_FIELDS = (
    "type",
    "status",
    "flag",
    "service",
    "step",
    "saga_id",
    "attr",
    "started_after",
    "started_before",
)
# A job's page lists this many of its sagas (each one's action is in the audit log too).
BULK_ITEMS_SHOWN = 500
BULK_ITEM_STATUSES = ("pending", "done", "failed", "cancelled")
# The jobs page lists the newest this many.
BULK_JOBS_SHOWN = 100
BULK_POLLED = ("running", "awaiting_approval")


def _bulk_actions_for(user: Any) -> list[tuple[str, str]]:
    """(name, label) of the actions ``user`` may run; none for a viewer."""
    if not can_act(user):
        return []
    return [(name, a.label) for name, a in ACTIONS.items() if user.has_perm(a.permission)]


def _bulk_filter_query(query: QueryDict) -> QueryDict:
    """The saga list's filter fields in ``query`` (the URL's or a form's), nothing else."""
    out = QueryDict(mutable=True)
    for name in BULK_FILTER_FIELDS:
        values = [v for v in query.getlist(name) if v]
        if values:
            out.setlist(name, values)
    return out


def _bulk_filter_pairs(query: QueryDict) -> list[tuple[str, str]]:
    """One (name, value) per hidden input (``attr`` may repeat)."""
    return [(name, value) for name, values in query.lists() for value in values]


def _bulk_list_query(filters: dict[str, str]) -> str:
    """A job's selector parameters -> the saga list's query string (``attr.k`` -> ``attr=k=v``)."""
    query = QueryDict(mutable=True)
    for name, value in filters.items():
        if name.startswith("attr."):
            query.appendlist("attr", f"{name[5:]}={value}")
        else:
            query[name] = value
    return query.urlencode()


def _bulk_may(request: HttpRequest) -> None:
    if not can_act(request.user):
        raise PermissionDenied("Only operators and admins run bulk actions.")


def _bulk_preview_context(
    request: HttpRequest, form: QueryDict, errors: dict[str, str]
) -> dict[str, Any]:
    """The preview page: what the filter in ``form`` matches now, and the confirm form."""
    cfg = settings.SAGAADMIN
    filter_query = _bulk_filter_query(form)
    errors = dict(errors)
    params: dict[str, str] = {}
    preview = None
    try:
        params = _filter_params(filter_query)
        preview = bulk_preview(filters=params)
    except InvalidFilter as exc:
        errors.setdefault("filters", f"{exc.field}: {exc.message}")
    count = preview.count if preview else 0
    above = cfg["TWO_PERSON_BULK_ABOVE"]
    rate = cfg["BULK_RATE_PER_SECOND"]
    return {
        "action": form.get("action", ""),
        "reason": form.get("reason", ""),
        "bulk_actions": _bulk_actions_for(request.user),
        "filter_fields": _bulk_filter_pairs(filter_query),
        "filter_params": sorted(params.items()),
        "list_query": filter_query.urlencode(),
        "preview": preview,
        "sample": [(s, saga_detail_url(s)) for s in preview.sample] if preview else [],
        "more": count - len(preview.sample) if preview else 0,
        "most": cfg["BULK_MAX_SAGAS"],
        "too_many": count > cfg["BULK_MAX_SAGAS"],
        "above": above,
        "needs_approval": bool(above) and count > above,
        "rate": rate,
        "eta": _eta_text(count / rate) if rate > 0 and count else "",
        "errors": errors,
        "reason_max": REASON_MAX,
        "now": timezone.now(),
        "nav": "sagas",
    }


@require_GET
@viewer_required
def bulk_preview_view(request: HttpRequest) -> HttpResponse:
    """How many sagas the list's filter matches now, a sample, and "Confirm N sagas"."""
    _bulk_may(request)
    action = request.GET.get("action", "")
    errors: dict[str, str] = {}
    status = 200
    if action not in ACTIONS:
        errors["action"], status = "choose an action", 400
    elif not request.user.has_perm(ACTIONS[action].permission):
        errors["action"], status = f"your role may not {ACTIONS[action].label.lower()}", 403
    context = _bulk_preview_context(request, request.GET, errors)
    if status == 200 and context["errors"]:
        status = 400
    return _page(request, "tracking/bulk_preview.html", context, status=status)


@require_POST
@viewer_required
def bulk_start_view(request: HttpRequest) -> HttpResponse:
    """Start the job the operator confirmed, then its page.

    A refusal renders the preview again, counted afresh, with the message at the
    field it names and its status: 400 reason or filter (none, or too many), 403
    role, 409 the count changed since the preview (confirm the new one).
    """
    _bulk_may(request)
    action = request.POST.get("action", "")
    errors: dict[str, str] = {}
    try:
        expected_text = request.POST.get("expected_count", "").strip()
        try:
            expected_count = int(expected_text)
        except ValueError:
            raise ActionError(
                400, "expected_count", "preview first: confirm the count you saw"
            ) from None
        job = bulk_start(
            action=action,
            filters=_filter_params(_bulk_filter_query(request.POST)),
            reason=request.POST.get("reason", ""),
            user=request.user,
            expected_count=expected_count,
        )
    except InvalidFilter as exc:
        errors["filters"], status = f"{exc.field}: {exc.message}", 400
    except ActionError as exc:
        field = "action" if exc.field == "role" else exc.field
        errors[field], status = exc.message, exc.status
    else:
        label = ACTIONS[action].label
        if job.status == "awaiting_approval":
            messages.info(
                request,
                f"{label} on {job.total} sagas waits for a second operator to approve it"
                f" (bulk job {job.pk}).",
            )
        else:
            messages.success(request, f"{label} on {job.total} sagas started (bulk job {job.pk}).")
        return redirect("bulk-job", job_id=job.pk)
    context = _bulk_preview_context(request, request.POST, errors)
    return _page(request, "tracking/bulk_preview.html", context, status=status)


@dataclass(frozen=True, slots=True)
class BulkProgress:
    """A job's progress bar: processed of total, the succeeded and failed parts (percent)."""

    job: BulkJob
    percent: int
    succeeded_pct: float
    failed_pct: float
    not_done: int  # cancelled: the items that will not run
    eta: str  # running: about how long the rest takes at the job's rate

    @classmethod
    def of(cls, job: BulkJob) -> BulkProgress:
        total = job.total or 1
        rest = job.total - job.processed
        eta = ""
        if job.status == "running" and job.rate > 0 and rest:
            eta = _eta_text(rest / job.rate)
        return cls(
            job=job,
            percent=job.processed * 100 // total,
            succeeded_pct=round(job.succeeded * 100 / total, 2),
            failed_pct=round(job.failed * 100 / total, 2),
            not_done=rest if job.status == "cancelled" else 0,
            eta=eta,
        )


@require_GET
@viewer_required
def bulk_job_page(request: HttpRequest, job_id: int) -> HttpResponse:
    """A bulk job: its progress (the htmx poll gets the bar only), buttons, per-saga results."""
    job = BulkJob.objects.filter(pk=job_id).first()
    if job is None:
        raise Http404(f"No bulk job {job_id}.")
    if request.headers.get("HX-Request") and request.headers.get("HX-Target") == "bulk-progress":
        response = render(
            request, "tracking/bulk_job.html#bulk-progress", {"p": BulkProgress.of(job)}
        )
        if request.GET.get("seen", job.status) != job.status:
            response["HX-Refresh"] = "true"  # finished, approved, cancelled: the whole page
        return response
    shown = request.GET.get("items", "")
    if shown not in BULK_ITEM_STATUSES:
        shown = ""
    items = BulkItem.objects.filter(job=job).order_by("pk")
    counts = dict(items.order_by().values_list("status").annotate(n=Count("pk")))
    if shown:
        items = items.filter(status=shown)
    items_total = counts.get(shown, 0) if shown else job.total
    spec = ACTIONS.get(job.action)
    may = spec is not None and can_act(request.user) and request.user.has_perm(spec.permission)
    mine = job.actor == request.user.get_username()
    context = {
        "job": job,
        "p": BulkProgress.of(job),
        "label": spec.label if spec else job.action,
        "filter_params": sorted(job.filters.items()),
        "list_query": _bulk_list_query(job.filters),
        "items": items[:BULK_ITEMS_SHOWN],
        "items_total": items_total,
        "items_more": max(items_total - BULK_ITEMS_SHOWN, 0),
        "items_shown": shown,
        "item_counts": [(s, counts.get(s, 0)) for s in BULK_ITEM_STATUSES],
        "may_cancel": may and job.status in BULK_POLLED,
        "may_approve": may and job.status == "awaiting_approval" and not mine,
        "mine": mine,
        "now": timezone.now(),
        "nav": "sagas",
    }
    return _page(request, "tracking/bulk_job.html", context)


@require_GET
@viewer_required
def bulk_job_list_page(request: HttpRequest) -> HttpResponse:
    """Bulk jobs, newest first."""
    jobs = BulkJob.objects.order_by("-created_at", "-pk")[:BULK_JOBS_SHOWN]
    context = {
        "jobs": [BulkProgress.of(j) for j in jobs],
        "shown": BULK_JOBS_SHOWN,
        "now": timezone.now(),
        "nav": "sagas",
    }
    return _page(request, "tracking/bulk_jobs.html", context)


@require_POST
@viewer_required
def bulk_cancel_view(request: HttpRequest, job_id: int) -> HttpResponse:
    """Stop a job (running or waiting for approval); back to its page with a message."""
    _bulk_may(request)
    try:
        job = bulk_cancel(job_id=job_id, user=request.user)
    except BulkJob.DoesNotExist:
        raise Http404(f"No bulk job {job_id}.") from None
    except ActionError as exc:
        messages.error(request, f"Bulk job {job_id} was not cancelled: {exc.message}.")
    else:
        messages.success(
            request,
            f"Bulk job {job.pk} cancelled: {job.processed} of {job.total} sagas were processed,"
            " the rest will not be.",
        )
    return redirect("bulk-job", job_id=job_id)


@require_POST
@viewer_required
def bulk_approve_view(request: HttpRequest, job_id: int) -> HttpResponse:
    """The two-person rule: a second operator lets a big job run."""
    _bulk_may(request)
    try:
        job = bulk_approve(job_id=job_id, user=request.user)
    except BulkJob.DoesNotExist:
        raise Http404(f"No bulk job {job_id}.") from None
    except ActionError as exc:
        messages.error(request, f"Bulk job {job_id} was not approved: {exc.message}.")
    else:
        messages.success(request, f"Bulk job {job.pk} approved (asked by {job.actor}): it runs.")
    return redirect("bulk-job", job_id=job_id)


# -- the audit log ----------------------------------------------------------------

AUDIT_FILTERS = ("actor", "action", "saga_id", "outcome")
AUDIT_PAGE = 50


@require_GET
@viewer_required
def audit_page(request: HttpRequest) -> HttpResponseBase:
    """The audit log, newest first, filtered in the URL; ``?format=csv|jsonl`` exports it all."""
    params = {name: request.GET.get(name, "").strip() for name in AUDIT_FILTERS}
    export = request.GET.get("format", "")
    error = None
    page = None
    try:
        filters = AuditFilter.from_params(params)
        if export in EXPORTS:
            return audit_export(filters=filters, fmt=export, asgi=isinstance(request, ASGIRequest))
        if export:
            raise InvalidFilter("format", "csv or jsonl (or none for this page)")
        page = audit_list(
            filters=filters, cursor=request.GET.get("cursor") or None, limit=AUDIT_PAGE
        )
    except InvalidFilter as exc:
        error = exc
    next_query = None
    if page and page.next_cursor:
        copy = request.GET.copy()
        copy["cursor"] = page.next_cursor
        next_query = copy.urlencode()
    filtered = {k: v for k, v in params.items() if v}
    export_query = QueryDict(mutable=True)
    export_query.update(filtered)
    context = {
        "entries": page.entries if page else [],
        "q": params,
        "error": error,
        "filtered": bool(filtered),
        "next_query": next_query,
        "is_first_page": not request.GET.get("cursor"),
        "first_query": _without(request.GET, "cursor"),
        "export_query": export_query.urlencode(),
        # every action the log records: the operator actions and incident handling
        "actions": [*ACTIONS, AUDIT_ACKNOWLEDGE, AUDIT_RESOLVE],
        "outcomes": AUDIT_OUTCOMES,
        "now": timezone.now(),
        "nav": "audit",
    }
    return _page(request, "tracking/audit.html", context, status=400 if error else 200)


@require_GET
@viewer_required
def services_page(request: HttpRequest) -> HttpResponse:
    return _page(request, "tracking/services.html", _services_context(request))


def _services_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    since = timezone.now() - timedelta(minutes=5)
    recent = (
        TelemetryEvent.objects.filter(service=OuterRef("pk"), received_at__gte=since)
        .order_by()
        .values("service")
        .annotate(n=Count("pk"))
        .values("n")
    )
    services = Service.objects.annotate(
        recent=Coalesce(Subquery(recent), 0),
        active_keys=Count("keys", filter=Q(keys__revoked_at__isnull=True), distinct=True),
    ).order_by("name")
    keys = ServiceKey.objects.select_related("service").order_by("service__name", "-created_at")
    return {
        "services": [(s, round(s.recent / 300, 2)) for s in services],
        "keys": keys,
        "can_manage": can_manage_keys(request.user),
        "new_key": request.session.pop("new_key", None),
        "now": timezone.now(),
        "nav": "services",
        **extra,
    }


@require_POST
@viewer_required
def service_key_create_view(request: HttpRequest) -> HttpResponse:
    if not can_manage_keys(request.user):
        raise PermissionDenied("Only admins create keys.")
    name = request.POST.get("service", "").strip()
    if not SERVICE_NAME.fullmatch(name):
        context = _services_context(
            request, key_error="A service name is letters, digits, - and _ (at most 100)."
        )
        return _page(request, "tracking/services.html", context, status=400)
    created = service_key_create(service_name=name, name=f"dashboard:{request.user}")
    request.session["new_key"] = {"service": name, "secret": created.secret}
    return redirect("services")


@require_POST
@viewer_required
def service_key_revoke_view(request: HttpRequest, prefix: str) -> HttpResponse:
    if not can_manage_keys(request.user):
        raise PermissionDenied("Only admins revoke keys.")
    try:
        service_key_revoke(prefix=prefix)
    except ServiceKey.DoesNotExist:
        raise Http404("No such key.") from None
    return redirect("services")


@require_GET
@viewer_required
def overview_page(request: HttpRequest) -> HttpResponse:
    window = request.GET.get("window", "1h")
    if window not in WINDOWS:
        window = "1h"
    now = timezone.now()
    data = overview_get(window=window, now=now)
    since = data.since.strftime("%Y-%m-%dT%H:%M")
    counts = incident_counts()
    return _page(
        request,
        "tracking/overview.html",
        {
            "o": data,
            "incident_counts": counts,
            "incidents_unresolved": sum(counts.values()),
            "windows": list(WINDOWS),
            "since_param": since,
            "now": now,
            "nav": "overview",
            "chart": {
                "t": data.series_t,
                "started": data.series_started,
                "failed": data.series_failed,
                "rate": data.series_failure_rate,
            },
        },
    )


@require_GET
@viewer_required
def outbox_page(request: HttpRequest) -> HttpResponse:
    return _page(request, "tracking/outbox.html", _outbox_context(request))


def _outbox_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    now = timezone.now()
    stats = outbox_stats()
    return {
        "stats": stats,
        "lag_ms": None if (lag := stats.lag(now)) is None else lag.total_seconds() * 1000,
        "dead": OutboxMessage.objects.filter(status=OutboxStatus.DEAD).order_by("-seq")[:50],
        "can_act": can_act(request.user),
        "now": now,
        "nav": "outbox",
        "notice": request.session.pop("outbox_notice", None),
        **extra,
    }


@require_POST
@viewer_required
def outbox_requeue_view(request: HttpRequest) -> HttpResponse:
    """Requeue one dead message (``id``) or every dead one (``all``); operators only."""
    if not can_act(request.user):
        raise PermissionDenied("Only operators and admins requeue messages.")
    message_id = request.POST.get("id", "").strip()
    try:
        if request.POST.get("all") == "1":
            count = dead_requeue(all_dead=True)
        else:
            count = dead_requeue(message_ids=[str(UUID(message_id))])
    except ValueError:
        context = _outbox_context(request, error=f"id: not a message id: {message_id!r}")
        return _page(request, "tracking/outbox.html", context, status=400)
    request.session["outbox_notice"] = f"Requeued {count} message{'s' if count != 1 else ''}."
    return redirect("outbox")


# -- incidents -----------------------------------------------------------------

INCIDENT_FILTERS = ("state", "kind", "saga_type", "saga_id")


@require_GET
@viewer_required
def incident_list_page(request: HttpRequest) -> HttpResponse:
    context = _incidents_context(request, request.GET)
    return _page(
        request, "tracking/incidents.html", context, status=400 if context["error"] else 200
    )


def _incidents_context(request: HttpRequest, query: QueryDict, **extra: Any) -> dict[str, Any]:
    """The incidents page for the filters in ``query`` (the URL's, or a form's ``next``)."""
    params = {name: query.get(name, "").strip() for name in INCIDENT_FILTERS}
    params["state"] = params["state"] or "unresolved"
    error = None
    page = None
    try:
        page = incident_list(
            state=params["state"],
            kind=params["kind"],
            saga_type=params["saga_type"],
            saga_id=params["saga_id"],
            cursor=query.get("cursor") or None,
        )
    except InvalidFilter as exc:
        error = exc
    filtered = any(params[name] for name in ("kind", "saga_type", "saga_id"))
    if params["state"] == "unresolved" and not filtered:
        empty_text = "No unresolved incidents: nothing needs a look."
    elif filtered or params["state"] != "all":
        empty_text = "No incident matches this filter."
    else:
        empty_text = "No incidents yet."
    next_query = None
    if page and page.next_cursor:
        copy = query.copy()
        copy["cursor"] = page.next_cursor
        next_query = copy.urlencode()
    return {
        "incidents": page.incidents if page else [],
        "error": error,
        "q": params,
        "empty_text": empty_text,
        "states": INCIDENT_STATES,
        "kinds": IncidentKind.values,
        "saga_types": SagaType.objects.order_by("name").values_list("name", flat=True),
        "next_query": next_query,
        "first_query": _without(query, "cursor"),
        "is_first_page": not query.get("cursor"),
        "can_act": can_act(request.user),
        "back": f"{reverse('incidents')}?{query.urlencode()}" if query else reverse("incidents"),
        "note_max": NOTE_MAX,
        "show_saga": True,
        "now": timezone.now(),
        "nav": "incidents",
        **extra,
    }


@require_POST
@viewer_required
def incident_acknowledge_view(request: HttpRequest, incident_id: int) -> HttpResponse:
    return _incident_action(request, incident_id, "acknowledge")


@require_POST
@viewer_required
def incident_resolve_view(request: HttpRequest, incident_id: int) -> HttpResponse:
    return _incident_action(request, incident_id, "resolve")


def _incident_action(request: HttpRequest, incident_id: int, action: str) -> HttpResponse:
    """Acknowledge or resolve, then back to the page the form was on (operators and admins).

    A refused change (a missing note, resolved meanwhile) renders that page again
    with the reason at the form, with the status the service gave (400 or 409).
    """
    if not can_act(request.user):
        raise PermissionDenied("Only operators and admins acknowledge and resolve incidents.")
    back = _safe_back(request)
    note = request.POST.get("note", "")
    user = request.user.get_username()
    try:
        if action == "acknowledge":
            incident = incident_acknowledge(incident_id=incident_id, user=user, note=note)
        else:
            incident = incident_resolve(incident_id=incident_id, user=user, note=note)
    except Incident.DoesNotExist:
        raise Http404(f"No incident {incident_id}.") from None
    except IncidentRefused as exc:
        refused = {
            "incident_id": incident_id,
            "action": action,
            "field": exc.field,
            "message": exc.message,
            "note": note,
        }
        return _refused_page(request, back, refused, status=exc.status)
    done = "acknowledged" if action == "acknowledge" else "resolved"
    messages.success(
        request,
        f"Incident {incident.pk} ({incident.kind} on {incident.saga.saga_id}) {done}.",
    )
    return redirect(back)


def _safe_back(request: HttpRequest) -> str:
    """The form's ``next``: a path on this site, else the incidents page."""
    back = request.POST.get("next", "")
    if back.startswith("/") and url_has_allowed_host_and_scheme(
        back, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return back
    return reverse("incidents")


def _refused_page(
    request: HttpRequest, back: str, refused: dict[str, Any], *, status: int
) -> HttpResponse:
    """The page ``back`` names (a saga's detail page or the incidents page), with the refusal."""
    parts = urlsplit(back)
    query = QueryDict(parts.query)
    try:
        match = resolve(unquote(parts.path))
    except Resolver404:
        match = None
    if match is not None and match.url_name == "saga-detail":
        context = _saga_detail_context(request, match.kwargs["saga_id"], query, refused=refused)
        return _page(request, "tracking/saga_detail.html", context, status=status)
    context = _incidents_context(request, query, refused=refused)
    return _page(request, "tracking/incidents.html", context, status=status)


# -- saga types and their thresholds -------------------------------------------


@dataclass(frozen=True, slots=True)
class StepRow:
    """One step of a saga type: its configured threshold, learned durations, resulting bound."""

    name: str
    configured: int | None
    learned: Learned | None
    failure_pct: float | None
    bound: str


@dataclass(frozen=True, slots=True)
class ThresholdField:
    """One input of a saga type's edit form, with what was typed and what is wrong with it."""

    name: str
    label: str
    value: str
    placeholder: str
    error: str
    maximum: int


@dataclass(frozen=True, slots=True)
class TypeRow:
    saga_type: SagaType
    stuck_after: str
    max_attempts: str
    in_doubt_after: str
    step_thresholds: list[tuple[str, int]]  # configured, by step name
    steps: list[StepRow]
    fields: list[ThresholdField]
    steps_value: str  # the form's step thresholds, one "step=seconds" a line
    steps_error: str
    edited: bool  # the form was just submitted with an error: open it


def _eta_text(seconds: float) -> str:
    """How long a bulk job takes at its rate: "under a second", "about 12 s", ..."""
    if seconds < 1:
        return "under a second"
    return "about " + _seconds_text(round(seconds))


def _seconds_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{seconds:g} s ({minutes:g} min)"
    return f"{seconds:g} s ({minutes / 60:.3g} h)"


def _own_or_default(own: int | None, default: int, unit: str = "s") -> str:
    if unit == "s":
        return _seconds_text(own) if own else f"default {_seconds_text(default)}"
    return str(own) if own else f"default {default}"


def _step_rows(policy: Policy, row: SagaType) -> list[StepRow]:
    learned = {step: v for (saga_type, step), v in policy.learned.items() if saga_type == row.name}
    configured = {step: int(v) for step, v in (row.step_thresholds or {}).items()}
    rows = []
    for step in sorted({*learned, *configured}):
        seen = learned.get(step)
        bound = policy.step_bound(row.name, step)
        if bound is not None:
            text = bound.describe()
        else:
            count = seen.count if seen else 0
            text = f"learning ({count} of {policy.min_samples} samples)"
        rows.append(
            StepRow(
                name=step,
                configured=configured.get(step),
                learned=seen,
                failure_pct=round(seen.failure_rate * 100, 1) if seen else None,
                bound=text,
            )
        )
    return rows


def _step_lines(text: str) -> dict[str, str]:
    """The form's "step=seconds" lines as ``saga_type_update`` takes them."""
    steps: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        step, sep, seconds = line.rpartition("=")
        step = step.strip()
        if not sep or not step:
            raise InvalidThreshold(
                "step_thresholds", f"line {number}: write step=seconds, e.g. charge=30"
            )
        if step in steps:
            raise InvalidThreshold("step_thresholds", f"line {number}: step {step} is listed twice")
        steps[step] = seconds.strip()
    return steps


def _type_row(
    policy: Policy, row: SagaType, posted: QueryDict | None, error: InvalidThreshold | None
) -> TypeRow:
    cfg = settings.SAGAADMIN
    errors: dict[str, str] = {}
    if error is not None:  # "step_thresholds.charge" belongs to the step_thresholds field
        field, _, step = error.field.partition(".")
        errors[field] = f"{step}: {error.message}" if step else error.message

    def value(name: str, own: int | None) -> str:
        if posted is not None:
            return posted.get(name, "")
        return "" if own is None else str(own)

    fields = [
        ThresholdField(
            "stuck_after_seconds",
            "Stuck after (seconds)",
            value("stuck_after_seconds", row.stuck_after_seconds),
            f"default {cfg['STUCK_AFTER_SECONDS']}",
            errors.get("stuck_after_seconds", ""),
            MAX_THRESHOLD_SECONDS,
        ),
        ThresholdField(
            "max_attempts",
            "Max attempts",
            value("max_attempts", row.max_attempts),
            f"default {cfg['MAX_ATTEMPTS']}",
            errors.get("max_attempts", ""),
            1000,
        ),
        ThresholdField(
            "in_doubt_after_seconds",
            "In doubt after (seconds)",
            value("in_doubt_after_seconds", row.in_doubt_after_seconds),
            f"default {cfg['IN_DOUBT_AFTER_SECONDS']}",
            errors.get("in_doubt_after_seconds", ""),
            MAX_THRESHOLD_SECONDS,
        ),
    ]
    # sorted by name: PostgreSQL's jsonb keeps keys by length, then bytes
    thresholds = sorted((row.step_thresholds or {}).items())
    if posted is not None:
        steps_value = posted.get("step_thresholds", "")
    else:
        steps_value = "\n".join(f"{k}={v}" for k, v in thresholds)
    return TypeRow(
        saga_type=row,
        stuck_after=_own_or_default(row.stuck_after_seconds, cfg["STUCK_AFTER_SECONDS"]),
        max_attempts=_own_or_default(row.max_attempts, cfg["MAX_ATTEMPTS"], unit=""),
        in_doubt_after=_own_or_default(row.in_doubt_after_seconds, cfg["IN_DOUBT_AFTER_SECONDS"]),
        step_thresholds=thresholds,
        steps=_step_rows(policy, row),
        fields=fields,
        steps_value=steps_value,
        steps_error=errors.get("step_thresholds", ""),
        edited=posted is not None,
    )


def _saga_types_context(
    request: HttpRequest,
    *,
    edited: str = "",
    posted: QueryDict | None = None,
    error: InvalidThreshold | None = None,
) -> dict[str, Any]:
    now = timezone.now()
    policy = policy_load(now=now)
    cfg = settings.SAGAADMIN
    rows = [
        _type_row(policy, row, *((posted, error) if row.name == edited else (None, None)))
        for row in SagaType.objects.order_by("name")
    ]
    return {
        "types": rows,
        "error": error,
        "edited": edited,
        "defaults": {
            "stuck_after": _seconds_text(cfg["STUCK_AFTER_SECONDS"]),
            "max_attempts": cfg["MAX_ATTEMPTS"],
            "in_doubt_after": _seconds_text(cfg["IN_DOUBT_AFTER_SECONDS"]),
            "p99_multiple": policy.p99_multiple,
            "min_samples": policy.min_samples,
            "learn_days": cfg["LEARN_DAYS"],
        },
        "can_edit": can_edit_thresholds(request.user),
        "now": now,
        "nav": "saga-types",
    }


@require_http_methods(["GET", "POST"])
@viewer_required
def saga_types_page(request: HttpRequest) -> HttpResponse:
    """Every saga type's thresholds and learned step durations; admins edit them (POST)."""
    if request.method == "POST":
        return _saga_type_edit(request)
    return _page(request, "tracking/saga_types.html", _saga_types_context(request))


def _saga_type_edit(request: HttpRequest) -> HttpResponse:
    if not can_edit_thresholds(request.user):
        raise PermissionDenied("Only admins edit thresholds.")
    name = request.POST.get("name", "")
    try:
        changes: dict[str, Any] = {
            key: request.POST.get(key, "").strip()
            for key in ("stuck_after_seconds", "max_attempts", "in_doubt_after_seconds")
        }
        changes["step_thresholds"] = _step_lines(request.POST.get("step_thresholds", ""))
        row = saga_type_update(name=name, changes=changes, user=request.user.get_username())
    except SagaType.DoesNotExist:
        raise Http404(f"No saga type '{name}'.") from None
    except InvalidThreshold as exc:
        context = _saga_types_context(request, edited=name, posted=request.POST, error=exc)
        return _page(request, "tracking/saga_types.html", context, status=400)
    messages.success(request, f"Saved the thresholds of {row.name}.")
    return redirect(f"{reverse('saga-types')}#type-{row.pk}")


# -- the orchestrator ----------------------------------------------------------

# The Orchestrator page lists this many of the runs that are not finished (newest first).
RUNS_SHOWN = 100


@dataclass(frozen=True, slots=True)
class StartForm:
    """The "Start a saga" form: what was typed, and the error of the field it names."""

    saga_type: str
    saga_id: str
    data: str
    errors: dict[str, str]


@dataclass(frozen=True, slots=True)
class StepSpecRow:
    """A defined step as the page's definition table shows it."""

    name: str
    kind: str
    target: str  # remote: "service · command"
    max_attempts: int
    backoff: str
    timeout: str
    compensation: str


@dataclass(frozen=True, slots=True)
class DefinitionCard:
    name: str
    service: str
    steps: list[StepSpecRow]


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _step_spec_row(step: OrchestratorStep) -> StepSpecRow:
    retry = step.retry
    if retry.backoff_base == retry.backoff_max:
        backoff = _seconds(retry.backoff_max) if retry.backoff_max else "none"
    else:
        backoff = f"{retry.backoff_base:g}\u2013{_seconds(retry.backoff_max)}"
    if step.kind == "remote":
        compensation = step.undo_action
    elif step.kind == "tcc":
        cancel = "cancel" if step.compensation is not None else "no cancel"
        compensation = f"confirm, {cancel}" if step.confirm is not None else cancel
    else:
        compensation = "yes" if step.has_compensation else "none"
    return StepSpecRow(
        name=step.name,
        kind=step.kind,
        target=f"{step.service} \u00b7 {step.command}" if step.kind == "remote" else "",
        max_attempts=retry.max_attempts,
        backoff=backoff,
        timeout=_seconds(step.timeout),
        compensation=compensation,
    )


def _orchestrator_context(request: HttpRequest, *, form: StartForm | None = None) -> dict[str, Any]:
    runs, runs_total = runs_unfinished_list(limit=RUNS_SHOWN)
    definitions = definitions_list()
    return {
        "definitions": [
            DefinitionCard(d.name, d.service, [_step_spec_row(s) for s in d.steps])
            for d in definitions
        ],
        "circuits": circuits_list(),
        "runs": runs,
        "runs_total": runs_total,
        "can_start": can_start_sagas(request.user),
        "form": form or StartForm("", "", "", {}),
        "now": timezone.now(),
        "nav": "orchestrator",
    }


@require_http_methods(["GET", "POST"])
@viewer_required
def orchestrator_page(request: HttpRequest) -> HttpResponse:
    """Saga definitions, circuit breakers, runs not finished; admins start a saga (POST)."""
    if request.method == "POST":
        return _saga_start(request)
    return _page(request, "tracking/orchestrator.html", _orchestrator_context(request))


def _no_constant(name: str) -> Any:
    """Python's json reads NaN and Infinity; JSON (and the API's parser) does not."""
    raise ValueError(f"{name} is not a JSON value")


def _saga_start(request: HttpRequest) -> HttpResponse:
    """Start a saga, then its detail page; a refusal shows at the field it names (400)."""
    if not can_start_sagas(request.user):
        raise PermissionDenied("Only admins start sagas.")
    form = StartForm(
        saga_type=request.POST.get("saga_type", ""),
        saga_id=request.POST.get("saga_id", ""),
        data=request.POST.get("data", ""),
        errors={},
    )
    try:
        if not form.saga_type:
            raise StartRefused("saga_type", "choose a saga type")
        try:
            data = json.loads(form.data, parse_constant=_no_constant) if form.data.strip() else None
        except json.JSONDecodeError as exc:
            raise StartRefused(
                "data", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise StartRefused("data", f"not valid JSON: {exc}") from None
        result = orchestrated_saga_start(saga_type=form.saga_type, saga_id=form.saga_id, data=data)
    except UnknownSagaType as exc:
        refused = {"saga_type": f"no saga type {exc.name!r} is defined"}
    except StartRefused as exc:
        refused = {exc.field: exc.message}
    else:
        run = result.run
        if result.created:
            messages.success(request, f"Started {run.saga_type} saga {run.saga_id}.")
        else:
            messages.info(
                request,
                f"Saga {run.saga_id} exists already ({run.status}): nothing new was started.",
            )
        return redirect(saga_detail_url(run.saga_id))
    form = StartForm(form.saga_type, form.saga_id, form.data, refused)
    context = _orchestrator_context(request, form=form)
    return _page(request, "tracking/orchestrator.html", context, status=400)
