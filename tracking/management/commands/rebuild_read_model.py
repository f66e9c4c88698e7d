from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tracking.read_model import read_model_rebuild


class Command(BaseCommand):
    help = "Rebuild the saga read model (Saga, Step rows) from the event store."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--saga", default=None, help="rebuild only this saga id")

    def handle(self, *args: Any, saga: str | None, **options: Any) -> None:
        counts = read_model_rebuild(saga_id=saga)
        self.stdout.write(
            f"Rebuilt {counts['sagas']} saga(s): {counts['changed']} changed, "
            f"{counts['deleted']} without events removed."
        )
