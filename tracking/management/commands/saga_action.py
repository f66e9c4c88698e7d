import json
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tracking.actions import ACTIONS, ActionError, ActionInput, saga_action_run


class Command(BaseCommand):
    help = (
        "Run an operator action on a saga as a user, through the same checks, audit log and "
        "dispatch as the dashboard and the API; prints the answer as JSON. Without "
        "--expected-version the saga's version is not checked."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", help=f"one of {', '.join(ACTIONS)}")
        parser.add_argument("saga_id")
        parser.add_argument("--reason", required=True, help="why (written to the audit log)")
        parser.add_argument(
            "--as", dest="username", required=True, help="the user it runs as (their role)"
        )
        parser.add_argument("--step", default="", help="the step (default: the failed one)")
        parser.add_argument("--data", help="rerun: the saga's new data, a JSON object (admins)")
        parser.add_argument(
            "--expected-version", type=int, help="refuse (409) if the saga's version differs"
        )
        parser.add_argument("--request-id", help="repeat it to get the first answer back")

    def handle(self, *args: Any, **options: Any) -> None:
        username = options["username"]
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"as: no user {username!r}")
        data = None
        if options["data"] is not None:
            try:
                data = json.loads(options["data"])
            except json.JSONDecodeError as exc:
                raise CommandError(f"data: not JSON ({exc})") from None
            if not isinstance(data, dict):
                raise CommandError("data: a JSON object")
            if options["action"] != "rerun":
                raise CommandError("data: only rerun takes data")
        try:
            answer = saga_action_run(
                ActionInput(
                    action=options["action"],
                    saga_id=options["saga_id"],
                    actor=user,
                    reason=options["reason"],
                    expected_version=options["expected_version"],
                    step=options["step"],
                    data=data,
                    request_id=options["request_id"],
                )
            )
        except ActionError as exc:
            raise CommandError(f"{exc.field}: {exc.message}") from None
        self.stdout.write(json.dumps(answer, sort_keys=True))
