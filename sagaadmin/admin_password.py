"""Where ``manage.py ensure_admin`` keeps the generated admin password."""

from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings


def admin_password_path() -> Path:
    """Where ``ensure_admin`` keeps the generated password: one file per database.

    ``var/admin-password.txt`` for the embedded default (``var/sagaadmin.sqlite3``);
    ``var/admin-password-<database>.txt`` for any other, so two databases run from
    one checkout never read each other's password.
    """
    var = Path(settings.VAR_DIR)
    db = settings.DATABASES["default"]
    name = str(db.get("NAME") or "")
    if db["ENGINE"].endswith("sqlite3") and Path(name) == var / "sagaadmin.sqlite3":
        return var / "admin-password.txt"
    if db["ENGINE"].endswith("sqlite3"):
        label = Path(name).stem
    else:
        label = f"{name}-{db.get('HOST') or 'local'}-{db.get('PORT') or ''}".rstrip("-")
    return var / f"admin-password-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.txt"


def admin_password_shown() -> str:
    """The password file as the login page names it (relative to the checkout)."""
    path = admin_password_path()
    try:
        return str(path.relative_to(settings.BASE_DIR))
    except ValueError:
        return str(path)
