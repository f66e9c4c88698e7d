from __future__ import annotations

from typing import Any

from django import template

from tracking.roles import user_role
from tracking.timeline import format_duration

register = template.Library()


@register.filter
def duration(ms: int | float | None) -> str:
    return format_duration(ms)


@register.filter
def role_of(user: Any) -> str:
    return user_role(user) or "no role"
