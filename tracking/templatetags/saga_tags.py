from __future__ import annotations

from typing import Any

from django import template

from tracking.roles import user_role

register = template.Library()


@register.filter
def duration(ms: int | float | None) -> str:
    """1234 -> '1.2 s'; None -> '-'."""
    if ms is None:
        return "-"
    if ms < 0:
        return "-" + duration(-ms)
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


@register.filter
def role_of(user: Any) -> str:
    return user_role(user) or "no role"


@register.filter
def skew_ms(event: Any) -> int:
    return int((event.occurred_at - event.received_at).total_seconds() * 1000)


@register.filter
def absval(value: int) -> int:
    return abs(value)
