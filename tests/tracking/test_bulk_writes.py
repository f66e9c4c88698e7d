"""tracking/bulk.py on PostgreSQL: the repeated bulk statements are prepared."""

from __future__ import annotations

import json

from django.db import connection, transaction

from tracking.ingest import events_ingest
from tracking.keys import service_get_or_create


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
