"""Bulk writes that stay fast on PostgreSQL and correct everywhere.

On PostgreSQL rows travel by ``COPY`` (into the table, or into a temporary
staging table followed by one ``INSERT ... SELECT ... ON CONFLICT``): building
one huge parameterised statement costs more Python time than the database
needs to store the rows (docs/decisions/0007-copy-for-bulk-writes.md). On
other databases the same calls use the ORM's bulk operations.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from django.db import IntegrityError, connection, models, transaction
from psycopg import pq
from psycopg.adapt import Dumper
from psycopg.pq import Format

from sagaadmin.db import server_side, server_side_cursor

Row = Sequence[Any]


def _is_pg() -> bool:
    return connection.vendor == "postgresql"


def _fields(model: type[models.Model], columns: Sequence[str]) -> list[models.Field[Any, Any]]:
    return [_field(model, c) for c in columns]


def _field(model: type[models.Model], name: str) -> models.Field[Any, Any]:
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field


def _column(field: models.Field[Any, Any]) -> str:
    return connection.ops.quote_name(field.column or field.name)


@dataclass(frozen=True, slots=True, eq=False)  # one per (model, columns): hashed by identity
class _Shape:
    """What writing ``columns`` of ``model`` needs, computed once per process."""

    table: str
    names: str
    fields: list[models.Field[Any, Any]]
    json: frozenset[int]  # indexes of JSON columns (sent as encoded text)
    array_types: list[str]  # element types for unnest
    stage: str  # temporary staging table for COPY


@functools.cache
def _shape(model: type[models.Model], columns: tuple[str, ...]) -> _Shape:
    fields = _fields(model, columns)
    names = ", ".join(_column(f) for f in fields)
    tag = hashlib.sha1(f"{model._meta.db_table}:{names}".encode(), usedforsecurity=False)
    return _Shape(
        table=connection.ops.quote_name(model._meta.db_table),
        names=names,
        fields=fields,
        json=frozenset(i for i, f in enumerate(fields) if isinstance(f, models.JSONField)),
        array_types=[_array_type(f) for f in fields],
        stage=f"stage_{tag.hexdigest()[:12]}",
    )


class _JsonbBinary(Dumper):
    """Already-encoded JSON (bytes from msgspec) as binary ``jsonb``: version 1 + the text."""

    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + obj


@functools.cache
def _jsonb_dumper(oid: int) -> type[Dumper]:
    return type("JsonbBinaryBytes", (_JsonbBinary,), {"oid": oid})


def _copy(cursor: Any, table: str, shape: _Shape, rows: Sequence[Row]) -> None:
    """COPY rows in binary format (the columns' types are known, so psycopg's C
    dumpers write them and PostgreSQL parses no text); JSON columns go as
    msgspec-encoded bytes."""
    json_columns = shape.json
    encode = msgspec.json.encode
    raw = cursor.cursor
    if json_columns:  # this cursor's own adapters: bytes stay bytea everywhere else
        raw.adapters.register_dumper(None, _jsonb_dumper(raw.adapters.types["jsonb"].oid))
    with raw.copy(f"COPY {table} ({shape.names}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(shape.array_types)
        for row in rows:
            if json_columns:
                row = list(row)
                for i in json_columns:
                    if row[i] is not None:
                        row[i] = encode(row[i])
            copy.write_row(row)


# Staging tables this process created, per database connection, and those
# filled since the connection's last commit (ON COMMIT DELETE ROWS empties them).
_created: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_filled: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _stage(shape: _Shape, rows: Sequence[Row]) -> str:
    """COPY rows into a per-connection temporary table shaped like the columns.

    Created once per connection (not re-created by every batch); emptied
    before reuse within a transaction. Must run inside a transaction (the rows
    vanish at commit).
    """
    raw = connection.connection
    created = _created.setdefault(raw, set())
    filled = _filled.setdefault(raw, set())
    stage = shape.stage
    with connection.cursor() as cursor:
        if stage not in created:  # known only once a commit kept the CREATE
            cursor.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "  # noqa: S608
                f"SELECT {shape.names} FROM {shape.table} WITH NO DATA"
            )
            transaction.on_commit(lambda: created.add(stage))
        if stage in filled:  # used earlier in this transaction (or one that rolled back)
            cursor.execute(f"TRUNCATE {stage}")
        else:
            filled.add(stage)
            transaction.on_commit(lambda: filled.discard(stage))
        with connection.wrap_database_errors:  # psycopg's errors as Django's (503, not 500)
            _copy(cursor, shape.stage, shape, rows)
    return shape.stage


COPY_MIN_ROWS = 64  # below this, one multi-row VALUES statement is fewer round trips


def _copy_worth(rows: Sequence[Row]) -> bool:
    """COPY (straight or staged) for many rows on PostgreSQL, unless the connection is
    in pipeline mode (:func:`pipelined_transaction`), where COPY is not allowed."""
    if not _is_pg() or len(rows) < COPY_MIN_ROWS:
        return False
    connection.ensure_connection()
    return not in_pipeline()


@contextlib.contextmanager
def pipelined_transaction(*, rows: int) -> Iterator[None]:
    """``transaction.atomic(durable=True)`` whose statements run in psycopg's pipeline
    mode (PostgreSQL, and ``rows`` — the most rows a statement may write — below
    ``COPY_MIN_ROWS``; otherwise just the transaction).

    Statements whose results nobody reads (the writes at the end of an ingest
    transaction) wait for the server together with the ``COMMIT``, which is
    queued behind them: the transaction's closing writes and its commit cost one
    round trip. (The commit is sent as a statement inside the block, so that
    Django's own commit, when the block ends, finds nothing left to commit and
    runs the on-commit hooks.) An error of a queued statement surfaces later
    than it would otherwise — at whichever later statement happens to read the
    server's answer, or at the end of the block — and fails the whole
    transaction: caught there (by a nested ``atomic()``, say), it leaves the
    pipeline aborted, every later statement fails, and nothing is committed.
    So the block must not count on catching a database error where it happens.
    ``rows`` is a hint: the number of events, say; past it nothing is pipelined.
    """
    # (inside a test case's transaction, which a durable block may join, COMMIT
    # would end the test's transaction: no pipeline there)
    outermost = not connection.in_atomic_block
    with transaction.atomic(durable=True):
        if not outermost or not _is_pg() or rows >= COPY_MIN_ROWS:
            yield
            return
        connection.ensure_connection()
        raw = connection.connection
        with connection.wrap_database_errors, raw.pipeline():
            yield
            # not when the block asked for a rollback (Django then rolls back), nor
            # when it ran no statement (nothing to commit)
            if (
                not connection.needs_rollback
                and raw.pgconn.transaction_status != pq.TransactionStatus.IDLE
            ):
                raw.execute("COMMIT")


def _insert(
    model: type[models.Model], columns: Sequence[str], rows: Sequence[Row], suffix: str
) -> list[Any]:
    """``INSERT INTO table (columns) <rows> <suffix>``; the rows' RETURNING values.

    Rows are inserted in the order given (callers sort them, so concurrent
    inserters take unique-index locks in one order and cannot deadlock).
    """
    if not rows:
        return []
    shape = _shape(model, tuple(columns))
    table, names, fields = shape.table, shape.names, shape.fields
    returns = "RETURNING" in suffix
    if _copy_worth(rows):
        stage = _stage(shape, rows)
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} "  # noqa: S608
                f"ORDER BY ctid {suffix}"
            )
            return list(cursor.fetchall()) if returns else []
    if _is_pg():  # one statement, one array parameter per column
        return _unnest_insert(shape, rows, suffix, returns)
    out: list[Any] = []
    row_sql = "(" + ", ".join(["%s"] * len(fields)) + ")"
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        params = [
            f.get_db_prep_save(v, connection)
            for row in chunk
            for f, v in zip(fields, row, strict=True)
        ]
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({names}) VALUES "  # noqa: S608
                f"{', '.join([row_sql] * len(chunk))} {suffix}",
                params,
            )
            if returns:
                out += cursor.fetchall()
    return out


@functools.cache
def _unnest_sql(shape: _Shape, suffix: str) -> str:
    aliases = ", ".join(f"c{i}" for i in range(len(shape.fields)))
    return (
        f"INSERT INTO {shape.table} ({shape.names}) SELECT {aliases} FROM unnest("  # noqa: S608
        + ", ".join(f"%b::{t}[]" for t in shape.array_types)
        + f") WITH ORDINALITY AS u({aliases}, ord) ORDER BY ord {suffix}"
    )


# Column types whose values travel exactly as JSON and cast back from its text
# (floats do not: msgspec writes NaN as null; bytes have no JSON form).
JSON_ROW_TYPES = frozenset(
    {
        "text",
        "integer",
        "bigint",
        "smallint",
        "boolean",
        "timestamp with time zone",
        "jsonb",
        "uuid",
        "date",
    }
)


def _json_ok(shape: _Shape) -> bool:
    return all(t in JSON_ROW_TYPES for t in shape.array_types)


def _unnest_insert(shape: _Shape, rows: Sequence[Row], suffix: str, returns: bool) -> list[Any]:
    if not _json_ok(shape):  # one array per column
        return server_side(_unnest_sql(shape, suffix), _arrays(shape, rows), returns=returns)
    return server_side(_json_sql(shape, suffix), [_json_rows(rows)], returns=returns)


@functools.cache
def _json_sql(shape: _Shape, suffix: str) -> str:
    """INSERT the rows of one JSON array parameter (a row: an array of column values).

    msgspec encodes the rows in microseconds where psycopg dumps array elements
    one by one in Python; PostgreSQL parses the JSON in C and casts each value
    (JSON columns are taken as they are, JSON null as SQL NULL). ADR 0007.
    """
    return (
        f"INSERT INTO {shape.table} ({shape.names}) SELECT {_json_picks(shape)} "  # noqa: S608
        f"FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS u(r, ord) ORDER BY ord {suffix}"
    )


def _json_picks(shape: _Shape) -> str:
    return ", ".join(
        f"NULLIF(r->{i}, 'null'::jsonb)" if t == "jsonb" else f"(r->>{i})::{t}"
        for i, t in enumerate(shape.array_types)
    )


def _json_rows(rows: Sequence[Row]) -> str:
    return msgspec.json.encode(rows).decode()


def _arrays(shape: _Shape, rows: Sequence[Row]) -> list[list[Any]]:
    """Rows as one list per column (JSON columns encoded), for ``unnest``."""
    columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
    encode = msgspec.json.encode
    for i in shape.json:
        columns[i] = [None if v is None else encode(v).decode() for v in columns[i]]
    return columns


# The rows of a statement already sent, read when called.
Later = Callable[[], list[Any]]


def _server_side_later(sql: str, params: list[Any]) -> Later:
    """:func:`sagaadmin.db.server_side`, its rows read when the returned function is called: in
    pipeline mode (:func:`pipelined_transaction`) statements sent this way one
    after the other wait for the server together, once."""
    cursor = server_side_cursor()
    cursor.execute(sql, params)

    def rows() -> list[Any]:
        with cursor:
            return list(cursor.fetchall())

    return rows


def in_pipeline() -> bool:
    """Whether this thread's connection is in psycopg's pipeline mode."""
    raw = connection.connection if _is_pg() else None
    return raw is not None and raw.pgconn.pipeline_status != pq.PipelineStatus.OFF


def fetch_later(sql: str, params: list[Any]) -> Later:
    """Rows of a PostgreSQL query with server-side binding (``%b`` for arrays), prepared
    once it repeats (see :mod:`sagaadmin.db`), read when the returned function is
    called."""
    return _server_side_later(sql, params)


def _array_type(field: models.Field[Any, Any]) -> str:
    """The element type for ``unnest``; varchar lengths are checked by the table itself."""
    db_type = field.db_type(connection) or "text"
    if db_type.startswith("varchar"):
        return "text"
    return db_type.split(" CHECK")[0].replace("serial", "integer")


def insert_ignore_returning(
    model: type[models.Model],
    columns: Sequence[str],
    rows: Sequence[Row],
    *,
    conflict: Sequence[str],
    returning: str | Sequence[str],
) -> list[Any]:
    """INSERT rows, skipping conflicts on ``conflict``; return ``returning`` of the stored ones.

    One column name gives a list of values, several a list of tuples.
    """
    names = (returning,) if isinstance(returning, str) else tuple(returning)
    rows_back = _insert(model, columns, rows, _ignore_suffix(model, tuple(conflict), names))
    return _returned(rows_back, returning)


def insert_ignore_returning_later(
    model: type[models.Model],
    columns: Sequence[str],
    rows: Sequence[Row],
    *,
    conflict: Sequence[str],
    returning: str | Sequence[str],
) -> Later:
    """:func:`insert_ignore_returning`, sent now, its result read when the returned
    function is called (one statement with JSON rows; otherwise run at once)."""
    shape = _shape(model, tuple(columns))
    if rows and _is_pg() and not _copy_worth(rows) and _json_ok(shape):
        names = (returning,) if isinstance(returning, str) else tuple(returning)
        sql = _json_sql(shape, _ignore_suffix(model, tuple(conflict), names))
        later = _server_side_later(sql, [_json_rows(rows)])
        return lambda: _returned(later(), returning)
    now = insert_ignore_returning(model, columns, rows, conflict=conflict, returning=returning)
    return lambda: now


def _returned(rows: list[Any], returning: str | Sequence[str]) -> list[Any]:
    if isinstance(returning, str):
        return [r[0] for r in rows]
    return [tuple(r) for r in rows]


@functools.cache
def _ignore_suffix(
    model: type[models.Model], conflict: tuple[str, ...], returning: tuple[str, ...]
) -> str:
    on = ", ".join(_column(_field(model, c)) for c in conflict)
    back = ", ".join(_column(_field(model, c)) for c in returning)
    return f"ON CONFLICT ({on}) DO NOTHING RETURNING {back}"


def upsert(
    model: type[models.Model],
    columns: Sequence[str],
    rows: Sequence[Row],
    *,
    conflict: Sequence[str],
    update: Sequence[str] = (),
    increment: Sequence[str] = (),
) -> None:
    """INSERT rows; where a row exists (by ``conflict``), set its ``update`` columns
    to the new values and add the new values to its ``increment`` columns."""
    w = upsert_write(model, columns, rows, conflict=conflict, update=update, increment=increment)
    _insert(w.model, w.columns, w.rows, w.suffix)


@functools.cache
def _upsert_suffix(
    model: type[models.Model],
    conflict: tuple[str, ...],
    update: tuple[str, ...],
    increment: tuple[str, ...],
) -> str:
    table = connection.ops.quote_name(model._meta.db_table)
    on = ", ".join(_column(_field(model, c)) for c in conflict)
    sets = [f"{_column(f)} = EXCLUDED.{_column(f)}" for f in _fields(model, update)]
    sets += [
        f"{_column(f)} = {table}.{_column(f)} + EXCLUDED.{_column(f)}"
        for f in _fields(model, increment)
    ]
    return f"ON CONFLICT ({on}) DO UPDATE SET {', '.join(sets)}"


def append(model: type[models.Model], columns: Sequence[str], rows: Sequence[Row]) -> None:
    """Append rows to an insert-only table (on PostgreSQL many rows go by one COPY
    straight into the table: there is no conflict to resolve, so no staging)."""
    if _copy_worth(rows):
        shape = _shape(model, tuple(columns))
        with connection.cursor() as cursor, connection.wrap_database_errors:
            _copy(cursor, shape.table, shape, rows)
        return
    _insert(model, columns, rows, "")


@dataclass(frozen=True, slots=True)
class Write:
    """One INSERT for :func:`write_all`: ``rows`` into ``columns`` of ``model``, then
    ``suffix`` (``ON CONFLICT ...``; empty: an append to an insert-only table)."""

    model: type[models.Model]
    columns: tuple[str, ...]
    rows: Sequence[Row]
    suffix: str = ""


def upsert_write(
    model: type[models.Model],
    columns: Sequence[str],
    rows: Sequence[Row],
    *,
    conflict: Sequence[str],
    update: Sequence[str] = (),
    increment: Sequence[str] = (),
) -> Write:
    """:func:`upsert`'s write, for :func:`write_all`."""
    suffix = _upsert_suffix(model, tuple(conflict), tuple(update), tuple(increment))
    return Write(model, tuple(columns), rows, suffix)


def write_all(writes: Sequence[Write]) -> None:
    """Run these writes (none returns rows; no two touch the same row).

    On PostgreSQL those below the COPY threshold go as one statement — one
    data-modifying CTE each, each inserting its rows in the order given — so a
    transaction's closing writes cost one statement to bind and run and one
    wait for the server, not one each; the others go as :func:`upsert` and
    :func:`append` send them.
    """
    todo = [w for w in writes if w.rows]
    together = [
        w for w in todo if _is_pg() and not _copy_worth(w.rows) and _json_ok(_write_shape(w))
    ]
    joined = {id(w) for w in together} if len(together) >= 2 else set()
    for w in todo:
        if id(w) not in joined:
            if w.suffix:
                _insert(w.model, w.columns, w.rows, w.suffix)
            else:
                append(w.model, w.columns, w.rows)
    if joined:
        sql = _ctes_sql(tuple((_write_shape(w), w.suffix) for w in together))
        server_side(sql, [_json_rows(w.rows) for w in together], returns=False)


def _write_shape(w: Write) -> _Shape:
    return _shape(w.model, w.columns)


@functools.cache
def _ctes_sql(parts: tuple[tuple[_Shape, str], ...]) -> str:
    ctes = ", ".join(
        f"w{i} AS (INSERT INTO {shape.table} ({shape.names}) "  # noqa: S608
        f"SELECT {_json_picks(shape)} FROM jsonb_array_elements(%s::jsonb) "
        f"WITH ORDINALITY AS u(r, ord) ORDER BY ord {suffix})"
        for i, (shape, suffix) in enumerate(parts)
    )
    return f"WITH {ctes} SELECT 1"


def insert_new_later(
    model: type[models.Model],
    columns: Sequence[str],
    rows: Sequence[Row],
    *,
    conflict: Sequence[str],
    key: str,
) -> Later:
    """INSERT rows, skipping those that conflict on ``conflict``; the returned function
    gives the ``key`` values of the rows stored (``key`` is one of ``columns``).

    Like :func:`insert_ignore_returning`, but on PostgreSQL many rows first go by
    one COPY straight into the table, inside a savepoint: when nothing
    conflicts (the usual case: reporters rarely resend) that skips the staging
    table and the ``INSERT ... SELECT ... ON CONFLICT``. A unique violation
    rolls back to the savepoint and takes the staged path, which sorts the
    conflicts out row by row. Rows are written in the order given either way.
    """
    if _copy_worth(rows):
        shape = _shape(model, tuple(columns))
        try:
            with (
                transaction.atomic(),
                connection.cursor() as cursor,
                connection.wrap_database_errors,  # psycopg's UniqueViolation as IntegrityError
            ):
                _copy(cursor, shape.table, shape, rows)
        except IntegrityError:  # some rows exist already (or a concurrent batch wrote them)
            pass
        else:
            at = list(columns).index(key)
            stored = [row[at] for row in rows]
            return lambda: stored
    return insert_ignore_returning_later(model, columns, rows, conflict=conflict, returning=key)


def update_rows(model: type[models.Model], columns: Sequence[str], rows: Sequence[Row]) -> None:
    """UPDATE existing rows by primary key: ``columns[0]`` is ``"id"``, each row its values.

    One ``UPDATE ... FROM unnest(...)`` on PostgreSQL (Django's ``bulk_update``
    builds a CASE per column and row, costly past a few hundred rows).
    """
    if not rows:
        return
    assert columns[0] == "id"
    shape = _shape(model, tuple(columns))
    if not _is_pg():
        with connection.cursor() as cursor:
            sets = ", ".join(f"{_column(f)} = %s" for f in shape.fields[1:])
            encode = msgspec.json.encode
            cursor.executemany(
                f"UPDATE {shape.table} SET {sets} WHERE id = %s",  # noqa: S608
                [
                    [
                        encode(v).decode() if i in shape.json and v is not None else v
                        for i, v in enumerate(row)
                        if i
                    ]
                    + [row[0]]
                    for row in rows
                ],
            )
        return
    server_side(_update_sql(shape), _arrays(shape, rows), returns=False)


@functools.cache
def _update_sql(shape: _Shape) -> str:
    aliases = [f"c{i}" for i in range(len(shape.fields))]
    sets = ", ".join(
        f"{_column(f)} = u.{a}" for f, a in zip(shape.fields[1:], aliases[1:], strict=True)
    )
    return (
        f"UPDATE {shape.table} AS t SET {sets} FROM unnest("  # noqa: S608
        + ", ".join(f"%b::{t}[]" for t in shape.array_types)
        + f") AS u({', '.join(aliases)}) WHERE t.id = u.c0"
    )
