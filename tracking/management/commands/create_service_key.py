from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tracking.keys import service_key_create


class Command(BaseCommand):
    help = "Create a reporting key for a service (created if new). The key is printed once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("service", help="service name, e.g. payment")
        parser.add_argument("--name", default="", help="a label for the key")
        parser.add_argument("--quiet", action="store_true", help="print only the key")

    def handle(self, *args: Any, service: str, name: str, quiet: bool, **options: Any) -> None:
        created = service_key_create(service_name=service, name=name)
        if quiet:
            self.stdout.write(created.secret)
            return
        self.stdout.write(f"Key for service '{service}' (shown once; store it now):")
        self.stdout.write(created.secret)
