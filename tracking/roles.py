"""Roles are groups (viewer, operator, admin); this module answers "who may do what"."""

from __future__ import annotations

from typing import Any

ROLE_ORDER = ("admin", "operator", "viewer")


def user_role(user: Any) -> str | None:
    """The user's strongest role, or None when they have none (no access)."""
    if not getattr(user, "is_authenticated", False):
        return None
    if user.is_superuser:
        return "admin"
    names = set(user.groups.values_list("name", flat=True))
    return next((role for role in ROLE_ORDER if role in names), None)


def can_view(user: Any) -> bool:
    return bool(getattr(user, "is_authenticated", False)) and user.has_perm("tracking.view_saga")


def can_manage_keys(user: Any) -> bool:
    return bool(getattr(user, "is_authenticated", False)) and user.has_perm("tracking.manage_keys")


def can_act(user: Any) -> bool:
    """Operators and admins: operator actions, requeueing dead outbox messages."""
    return bool(getattr(user, "is_authenticated", False)) and user.has_perm("tracking.act_on_saga")


def can_edit_thresholds(user: Any) -> bool:
    """Admins: saga-type thresholds."""
    return bool(getattr(user, "is_authenticated", False)) and user.has_perm(
        "tracking.edit_thresholds"
    )


def can_start_sagas(user: Any) -> bool:
    """Admins: start orchestrated sagas (tracking/migrations/0011_start_saga_role.py)."""
    return bool(getattr(user, "is_authenticated", False)) and user.has_perm(
        "orchestrator.start_saga"
    )
