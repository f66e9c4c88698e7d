from __future__ import annotations

from datetime import datetime
from typing import Any

from django import template

from tracking.fragments import DASH
from tracking.roles import user_role
from tracking.timeline import format_duration

register = template.Library()


@register.filter
def duration(ms: int | float | None) -> str:
    return format_duration(ms)


@register.filter
def elapsed(since: datetime | None, now: datetime) -> str:
    """How long from ``since`` to ``now``, as durations read elsewhere ("2.4 s", "3 min")."""
    if since is None:
        return DASH
    return format_duration(max((now - since).total_seconds(), 0) * 1000)


@register.filter
def role_of(user: Any) -> str:
    return user_role(user) or "no role"
