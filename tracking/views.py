"""Dashboard pages: server-rendered templates, htmx fragments, live refresh."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any
from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from outbox.maintenance import dead_requeue, outbox_stats
from outbox.models import OutboxMessage
from outbox.models import Status as OutboxStatus
from tracking.fragments import SAGA_ROW_FIELDS, event_rows_html, saga_rows_html, waterfall_html
from tracking.keys import service_key_create, service_key_revoke
from tracking.models import SagaStatus, Service, ServiceKey, TelemetryEvent
from tracking.overview import WINDOWS, overview_get
from tracking.roles import can_act, can_manage_keys, can_view
from tracking.selectors import (
    InvalidFilter,
    SagaFilter,
    saga_events_list,
    saga_get,
    saga_list,
)
from tracking.timeline import saga_timeline_build

View = Callable[..., HttpResponse]
SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
FLAGS = ("anomaly", "clock_skew")


def viewer_required(view: View) -> View:
    """Logged in, with at least the viewer role."""

    @login_required
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not can_view(request.user):
            raise PermissionDenied("Your account has no role yet: ask an admin to add you to one.")
        return view(request, *args, **kwargs)

    return wrapped


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
        "flags": FLAGS,
        "q": request.GET,
        "now": now,
        "nav": "sagas",
    }
    template = "tracking/saga_list.html"
    if request.headers.get("HX-Request") and request.headers.get("HX-Target") == "saga-table":
        template += "#saga-table"
    return render(request, template, context, status=400 if error else 200)


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


@require_GET
@viewer_required
def saga_detail_page(request: HttpRequest, saga_id: str) -> HttpResponse:
    saga = saga_get(saga_id=saga_id)
    if saga is None:
        raise Http404(f"No saga with id '{saga_id}'.")
    events = saga_events_list(saga_id=saga_id)
    shown = events if request.GET.get("events") == "all" else events[:EVENTS_FIRST]
    now = timezone.now()
    timeline = saga_timeline_build(saga=saga, events=events, now=now)
    context = {
        "saga": saga,
        "event_rows": event_rows_html(shown, 1, _skew_ms()),
        "events_more": len(events) - len(shown),
        "timeline": timeline,
        "waterfall": waterfall_html(timeline),
        "now": now,
        "nav": "sagas",
    }
    template = "tracking/saga_detail.html"
    if request.headers.get("HX-Request"):
        template += "#saga-body"
    return render(request, template, context)


def _skew_ms() -> int:
    from django.conf import settings

    return int(settings.SAGAADMIN["CLOCK_SKEW_SECONDS"] * 1000)


@require_GET
@viewer_required
def services_page(request: HttpRequest) -> HttpResponse:
    return render(request, "tracking/services.html", _services_context(request))


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
        return render(request, "tracking/services.html", context, status=400)
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
    return render(
        request,
        "tracking/overview.html",
        {
            "o": data,
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
    return render(request, "tracking/outbox.html", _outbox_context(request))


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
        return render(request, "tracking/outbox.html", context, status=400)
    request.session["outbox_notice"] = f"Requeued {count} message{'s' if count != 1 else ''}."
    return redirect("outbox")
