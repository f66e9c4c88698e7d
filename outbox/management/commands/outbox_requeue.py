"""``manage.py outbox_requeue``: send dead outbox messages again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from outbox.maintenance import dead_requeue


class Command(BaseCommand):
    help = "Requeue dead outbox messages, by id or by topic/type (or --all)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("ids", nargs="*", help="message ids (UUIDs)")
        parser.add_argument("--topic", help="only messages of this topic")
        parser.add_argument("--type", help="only messages of this type")
        parser.add_argument("--all", action="store_true", help="every dead message")

    def handle(self, *args: Any, **options: Any) -> None:
        filters: dict[str, Any] = {}
        if options["topic"]:
            filters["aggregatetype"] = options["topic"]
        if options["type"]:
            filters["type"] = options["type"]
        if not (options["ids"] or filters or options["all"]):
            raise CommandError("say which messages: ids, --topic, --type, or --all")
        try:
            n = dead_requeue(message_ids=options["ids"] or None, all_dead=options["all"], **filters)
        except Exception as exc:  # e.g. a malformed UUID
            raise CommandError(f"ids: {exc}") from exc
        self.stdout.write(f"requeued {n} dead message{'s' if n != 1 else ''}")
