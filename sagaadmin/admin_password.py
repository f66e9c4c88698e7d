"""Where ``manage.py ensure_admin`` keeps the generated admin password."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from django.conf import settings

LEGACY = "admin-password.txt"  # the one file every database shared before


def admin_password_path(db: dict[str, Any] | None = None) -> Path:
    """One file per database, so two databases run from one checkout never read each
    other's password: ``var/admin-password.txt`` for the embedded default
    (``var/sagaadmin.sqlite3``), ``var/admin-password-<12 hex>.txt`` for any other, the
    hex a hash of the database's engine, name, host and port (nothing about the
    database can be read from the name). ``db``: a DATABASES entry (default: "default")."""
    var = Path(settings.VAR_DIR)
    db = settings.DATABASES["default"] if db is None else db
    name = str(db.get("NAME") or "")
    if db["ENGINE"].endswith("sqlite3") and Path(name) == var / "sagaadmin.sqlite3":
        return var / LEGACY
    identity = "\n".join(str(db.get(k) or "") for k in ("ENGINE", "NAME", "HOST", "PORT"))
    return var / f"admin-password-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.txt"
