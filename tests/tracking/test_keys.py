"""Service keys: shown once, stored hashed, revocable; the commands around them."""

from __future__ import annotations

import hashlib
import io

import pytest
from django.core.management import CommandError, call_command

from tracking.keys import service_key_authenticate, service_key_create
from tracking.models import Service, ServiceKey


def test_a_key_is_stored_only_as_prefix_and_hash(db) -> None:
    created = service_key_create(service_name="payment")
    row = ServiceKey.objects.get()
    assert created.secret.startswith(f"sa_{row.prefix}_")
    assert row.hashed == hashlib.sha256(created.secret.encode()).hexdigest()
    assert created.secret not in {row.prefix, row.hashed, row.name}


def test_authentication_checks_the_whole_key(db) -> None:
    created = service_key_create(service_name="payment")
    assert service_key_authenticate(secret=created.secret).service.name == "payment"
    assert service_key_authenticate(secret=created.secret[:-1] + "x") is None
    assert service_key_authenticate(secret="not-a-key") is None
    assert ServiceKey.objects.get().last_used_at is not None


def test_create_and_revoke_commands(db) -> None:
    out = io.StringIO()
    call_command("create_service_key", "shipping", "--name", "prod", stdout=out)
    secret = out.getvalue().strip().splitlines()[-1]
    assert "shown once" in out.getvalue()
    assert Service.objects.filter(name="shipping").exists()
    assert service_key_authenticate(secret=secret) is not None
    out = io.StringIO()
    call_command("revoke_service_key", secret, stdout=out)
    assert "Revoked key" in out.getvalue()
    assert service_key_authenticate(secret=secret) is None


def test_quiet_prints_only_the_key(db) -> None:
    out = io.StringIO()
    call_command("create_service_key", "order", "--quiet", stdout=out)
    assert out.getvalue().startswith("sa_")
    assert len(out.getvalue().split()) == 1


def test_revoking_an_unknown_key_is_a_clear_error(db) -> None:
    with pytest.raises(CommandError, match="No key with prefix"):
        call_command("revoke_service_key", "sa_ffffffffffff")


def test_service_last_event_time_moves_after_commit(
    api, make_event, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        api.batch([make_event("saga.started")])
    assert Service.objects.get(name="payment").last_event_at is None  # not before commit
    for callback in callbacks:
        callback()
    assert Service.objects.get(name="payment").last_event_at is not None


def test_ensure_admin_creates_once_and_prints_the_login(db, tmp_path, settings) -> None:
    settings.VAR_DIR = tmp_path
    first, second = io.StringIO(), io.StringIO()
    call_command("ensure_admin", stdout=first)
    call_command("ensure_admin", stdout=second)
    from sagaadmin.admin_password import admin_password_path

    password = admin_password_path().read_text().strip()
    assert admin_password_path().parent == tmp_path
    assert "Created user 'admin'" in first.getvalue()
    assert f"admin / {password}" in second.getvalue()
    assert "Created" not in second.getvalue()
    from django.contrib.auth import authenticate

    assert authenticate(username="admin", password=password) is not None


def test_ensure_admin_keeps_one_password_file_per_database(db, tmp_path, settings) -> None:
    """Two databases run from one checkout: each prints its own admin password, and the
    file's name tells nothing about the database."""
    from sagaadmin.admin_password import admin_password_path

    settings.VAR_DIR = tmp_path
    # (DATABASES itself is left alone: connections made later in other threads read it)
    names = [
        admin_password_path({"ENGINE": engine, "NAME": name})
        for engine, name in (
            ("django.db.backends.sqlite3", str(tmp_path / "sagaadmin.sqlite3")),
            ("django.db.backends.sqlite3", str(tmp_path / "other" / "sagaadmin.sqlite3")),
            ("django.db.backends.postgresql", "prod_db"),
            ("django.db.backends.postgresql", "stage_db"),
        )
    ]
    assert names[0] == tmp_path / "admin-password.txt"
    assert len(set(names)) == 4 and all(p.parent == tmp_path for p in names)
    assert not any("prod" in p.name or "stage" in p.name or "other" in p.name for p in names)


def test_ensure_admin_still_finds_the_password_an_earlier_version_kept(
    db, tmp_path, settings
) -> None:
    from django.contrib.auth import get_user_model

    from sagaadmin.admin_password import admin_password_path

    settings.VAR_DIR = tmp_path
    get_user_model().objects.create_superuser("admin", "", "kept-before-123")
    (tmp_path / "admin-password.txt").write_text("kept-before-123\n")
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    assert "admin / kept-before-123" in out.getvalue()
    assert admin_password_path().read_text().strip() == "kept-before-123"


def test_ensure_admin_never_prints_a_password_that_does_not_log_in(db, tmp_path, settings) -> None:
    from django.contrib.auth import get_user_model

    from sagaadmin.admin_password import admin_password_path

    settings.VAR_DIR = tmp_path
    call_command("ensure_admin", stdout=io.StringIO())
    admin_password_path().write_text("someone-elses-password\n")  # another database's file
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    assert "someone-elses-password" not in out.getvalue()
    assert "changepassword admin" in out.getvalue()
    user = get_user_model().objects.get(username="admin")
    user.set_password("new-one-123")
    user.save()
    admin_password_path().write_text("new-one-123\n")
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    assert "admin / new-one-123" in out.getvalue()
