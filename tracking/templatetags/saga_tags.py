from __future__ import annotations

from datetime import datetime
from typing import Any

from django import template
from django.utils.safestring import SafeData, SafeString

from tracking.fragments import DASH, breaks_add, esc_breakable
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


@register.filter(is_safe=True)
def breakable(text: Any) -> SafeString:
    """Escaped, with line-break opportunities between the words of a step or type name
    (``fragments.esc_breakable``): a long name wraps in its column, it does not spill
    into the next one. For text only: a value marked safe is taken as escaped text
    (e.g. ``join``'s output), never as markup (``</a>`` would get a break inside)."""
    if isinstance(text, SafeData):  # escaped already (e.g. by ``join``)
        return SafeString(breaks_add(str(text)))
    return SafeString(esc_breakable(str(text)))


@register.filter
def role_of(user: Any) -> str:
    return user_role(user) or "no role"
