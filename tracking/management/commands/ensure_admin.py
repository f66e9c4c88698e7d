import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection

from sagaadmin.admin_password import LEGACY, admin_password_path


class Command(BaseCommand):
    help = "Create the first admin user with a generated password (once) and print the login."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        user_model = get_user_model()
        path = admin_password_path()
        user = user_model.objects.filter(username=username).first()
        if user is None:
            password = secrets.token_urlsafe(12)
            user_model.objects.create_superuser(username=username, email="", password=password)
            _keep(path, password)
            self.stdout.write(f"Created user '{username}'.")
            self.stdout.write(f"Log in as  {username} / {password}")
            return
        # this database's file, then the shared file of earlier versions (one file for
        # the embedded default)
        for candidate in dict.fromkeys((path, path.parent / LEGACY)):
            kept = candidate.read_text().strip() if candidate.exists() else ""
            if kept and user.check_password(kept):
                if candidate != path:  # this database's own file from now on
                    _keep(path, kept)
                self.stdout.write(f"Log in as  {username} / {kept}")
                return
        # Never reset a password behind the operator's back: say how to set one.
        where = f"{connection.vendor} database {settings.DATABASES['default'].get('NAME')}"
        self.stdout.write(
            f"Log in as  {username} / (the password set for this {where}; it was changed "
            f"or never kept in {path}: `.venv/bin/python manage.py changepassword "
            f"{username}` sets a new one)"
        )


def _keep(path: Path, password: str) -> None:
    """Write the password where only this user can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(password + "\n")
    path.chmod(0o600)
