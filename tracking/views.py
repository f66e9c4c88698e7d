"""Dashboard pages: server-rendered templates, htmx fragments, live refresh."""

from __future__ import annotations

import json
import re
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
from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
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
from tracking.api.orchestrator import orchestrated_saga_start, run_state_get, runs_unfinished_list
from tracking.fragments import (
    SAGA_ROW_FIELDS,
    event_rows_html,
    incident_badges_html,
    saga_detail_url,
    saga_rows_html,
    waterfall_html,
)
from tracking.incidents import NOTE_MAX, IncidentRefused, incident_acknowledge, incident_resolve
from tracking.keys import service_key_create, service_key_revoke
from tracking.models import (
    Incident,
    IncidentKind,
    SagaStatus,
    SagaType,
    Service,
    ServiceKey,
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
    INCIDENT_STATES,
    InvalidFilter,
    SagaFilter,
    incident_counts,
    incident_list,
    saga_events_list,
    saga_get,
    saga_list,
)
from tracking.timeline import saga_timeline_build

View = Callable[..., HttpResponse]
SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
# The saga list's flag filter: the projection's flags, then the kinds of open incidents
# (the detector mirrors those in Saga.open_incidents; "anomaly" is a flag already).
SAGA_FLAGS = ("anomaly", "clock_skew")
INCIDENT_FLAGS = tuple(k for k in IncidentKind.values if k not in SAGA_FLAGS)
FLAGS = (("Flag", SAGA_FLAGS), ("Open incident", INCIDENT_FLAGS))  # <optgroup>s


def viewer_required(view: View) -> View:
    """Logged in, with at least the viewer role."""

    @login_required
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
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
    return {
        "saga": saga,
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
        "run": run_state_get(saga_id=saga_id),
        "now": now,
        "nav": "sagas",
        **extra,
    }


def _skew_ms() -> int:
    from django.conf import settings

    return int(settings.SAGAADMIN["CLOCK_SKEW_SECONDS"] * 1000)


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
