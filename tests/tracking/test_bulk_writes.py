"""tracking/bulk.py on PostgreSQL: the repeated bulk statements are prepared; writes in
pipeline mode."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone
from psycopg import pq

from tracking.bulk import COPY_MIN_ROWS, append, insert_ignore_returning, pipelined_transaction
from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create
from tracking.models import Service


def test_repeated_ingest_statements_are_prepared_on_postgresql(postgres, make_event) -> None:
    # given Django's default of never preparing, overridden by DATABASE_PREPARE_THRESHOLD
    service = service_get_or_create(name="payment")
    # when small batches (the unnest path) are ingested more often than the threshold
    for i in range(8):
        event = make_event("saga.started", saga_id=f"prepared-{i}", saga_type="order")
        with transaction.atomic():
            events_ingest(service=service, raws=[json.dumps(event).encode()])
    # then this connection holds the event insert as a prepared statement
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [row[0] for row in cursor.fetchall()]
    assert any(s.startswith('INSERT INTO "tracking_telemetryevent"') for s in statements), (
        statements
    )


@pytest.mark.django_db(transaction=True)
def test_a_pipelined_transaction_writes_many_rows_without_copy(postgres) -> None:
    """COPY is not allowed in pipeline mode: bulk writes fall back to unnest there."""
    # given a pipelined transaction that writes more rows than COPY_MIN_ROWS at once
    now = timezone.now()
    rows = [(f"pipelined-{i:03}", now) for i in range(COPY_MIN_ROWS + 10)]
    with pipelined_transaction(rows=1):
        assert connection.connection.pgconn.pipeline_status != pq.PipelineStatus.OFF
        append(Service, ["name", "created_at"], rows)
        stored = insert_ignore_returning(
            Service,
            ["name", "created_at"],
            [*rows[:2], ("pipelined-new", now)],
            conflict=("name",),
            returning="name",
        )
    # then every row is stored, and the conflicting ones were skipped
    assert stored == ["pipelined-new"]
    assert Service.objects.filter(name__startswith="pipelined-").count() == len(rows) + 1
    assert connection.connection.pgconn.pipeline_status == pq.PipelineStatus.OFF


@pytest.mark.django_db(transaction=True)
def test_a_failing_statement_in_a_pipelined_transaction_fails_all_of_it(postgres) -> None:
    # given a pipelined transaction whose second write breaks a unique constraint
    now = timezone.now()
    with pytest.raises(IntegrityError), pipelined_transaction(rows=1):
        append(Service, ["name", "created_at"], [("pipelined-a", now)])
        append(Service, ["name", "created_at"], [("pipelined-a", now)])
    # then nothing of it is stored, and the connection works on
    assert not Service.objects.filter(name="pipelined-a").exists()
    assert connection.connection.pgconn.pipeline_status == pq.PipelineStatus.OFF


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The commands psycopg itself sends (BEGIN, COMMIT, ROLLBACK: not statements)."""
    sent: list[bytes] = []
    original = psycopg.Connection._exec_command

    def spy(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(command if isinstance(command, bytes) else str(command).encode())
        return original(self, command, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "_exec_command", spy)
    return sent


@pytest.mark.django_db(transaction=True)
def test_a_pipelined_transaction_commits_in_the_pipeline_then_runs_its_on_commit_hooks(
    postgres, commands
) -> None:
    ran: list[bool] = []
    with pipelined_transaction(rows=1):
        append(Service, ["name", "created_at"], [("pipelined-hook", timezone.now())])
        transaction.on_commit(lambda: ran.append(True))
        assert ran == []
    # then the COMMIT went in the pipeline (Django's own commit found nothing to do),
    # the hook ran after it, and the row is there for everyone
    assert b"COMMIT" not in commands
    assert ran == [True]
    assert connection.connection.pgconn.transaction_status == pq.TransactionStatus.IDLE
    assert Service.objects.filter(name="pipelined-hook").exists()


@pytest.mark.django_db(transaction=True)
def test_a_pipelined_transaction_marked_for_rollback_commits_nothing(postgres) -> None:
    ran: list[bool] = []
    # given a block whose inner part failed and was caught (Django marks the
    # transaction for rollback)
    with pipelined_transaction(rows=1):
        append(Service, ["name", "created_at"], [("pipelined-rolled-back", timezone.now())])
        transaction.on_commit(lambda: ran.append(True))
        try:
            with transaction.atomic(savepoint=False):
                raise RuntimeError("an inner part fails")
        except RuntimeError:
            pass
    # then nothing is committed and no hook runs
    assert not Service.objects.filter(name="pipelined-rolled-back").exists()
    assert ran == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "answer_delay", [0.0, 0.05], ids=["error-read-at-the-end", "error-read-inside"]
)
def test_a_database_error_inside_a_pipelined_transaction_fails_it_whole(
    postgres, answer_delay: float
) -> None:
    """In pipeline mode an error surfaces late: at whichever later statement reads
    the server's answer, or when the block ends. Even when a nested atomic()
    catches it, the statements after it fail and nothing is committed."""
    now = timezone.now()
    with pytest.raises(DatabaseError), pipelined_transaction(rows=1):
        append(Service, ["name", "created_at"], [("pipelined-first", now)])
        try:
            with transaction.atomic():
                append(Service, ["name", "created_at"], [("pipelined-first", now)])
                time.sleep(answer_delay)  # the server's error is back before RELEASE is sent
        except IntegrityError:
            pass  # caught: the pipeline stays aborted, the next statement fails
        append(Service, ["name", "created_at"], [("pipelined-after", now)])
    # wherever it surfaced (inside, where it was caught, or at the end), nothing is kept
    assert not Service.objects.filter(name__startswith="pipelined-").exists()


@pytest.mark.django_db(transaction=True)
def test_a_pipelined_transaction_that_ran_no_statement_sends_nothing(postgres, commands) -> None:
    connection.ensure_connection()
    with pipelined_transaction(rows=1):
        pass
    assert commands == []


def test_inside_a_test_cases_transaction_nothing_is_pipelined_or_committed(postgres) -> None:
    with pipelined_transaction(rows=1):
        assert connection.connection.pgconn.pipeline_status == pq.PipelineStatus.OFF
        append(Service, ["name", "created_at"], [("pipelined-inner", timezone.now())])
    # the test's own transaction is still open (it rolls back at the end)
    assert connection.in_atomic_block
    assert connection.connection.pgconn.transaction_status == pq.TransactionStatus.INTRANS
