from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tracking.keys import service_key_revoke
from tracking.models import ServiceKey


class Command(BaseCommand):
    help = "Revoke a service key, given the key itself or its prefix."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="the key (sa_...) or its prefix")

    def handle(self, *args: Any, key: str, **options: Any) -> None:
        try:
            revoked = service_key_revoke(prefix=key)
        except ServiceKey.DoesNotExist:
            raise CommandError(f"No key with prefix '{key}'.") from None
        self.stdout.write(f"Revoked key {revoked.prefix} of service '{revoked.service.name}'.")
