"""Statements with server-side binding on Django's PostgreSQL connection.

Django's psycopg backend binds parameters on the client: each statement reaches
PostgreSQL as new SQL text, parsed and planned every time. The hot statements
(ingest's bulk writes, the outbox's ``publish()``) instead use a plain
``psycopg.Cursor`` on the same connection and transaction: the parameters
travel apart from the SQL text (arrays in binary with ``%b``: psycopg packs the
elements instead of escaping each one as text, several times cheaper), and a
statement that repeats gets prepared once per connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections


def server_side_cursor() -> Any:
    """A server-side-binding cursor on Django's connection, wrapped like Django's own
    (database errors become Django's; logged in ``connection.queries`` when debugging)."""
    connection = connections[DEFAULT_DB_ALIAS]  # once: each use of the proxy looks it up
    connection.ensure_connection()
    with connection.wrap_database_errors:
        raw_cursor = psycopg.Cursor(connection.connection)
    return (
        # django-stubs type these as taking a CursorWrapper; Django wraps a DB-API cursor
        connection.make_debug_cursor(raw_cursor)  # type: ignore[arg-type]
        if connection.queries_logged
        else connection.make_cursor(raw_cursor)  # type: ignore[arg-type]
    )


def server_side(sql: str, params: Sequence[Any] | Mapping[str, Any], *, returns: bool) -> list[Any]:
    """Execute ``sql`` with server-side binding (PostgreSQL only); its rows if ``returns``."""
    with server_side_cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if returns else []
