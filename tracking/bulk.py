"""Bulk writes that stay fast on PostgreSQL and correct everywhere.

On PostgreSQL rows travel by ``COPY`` (into the table, or into a temporary
staging table followed by one ``INSERT ... SELECT ... ON CONFLICT``): building
one huge parameterised statement costs more Python time than the database
needs to store the rows (docs/decisions/0007-copy-for-bulk-writes.md). On
other databases the same calls use the ORM's bulk operations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec
from django.db import connection, models

Row = Sequence[Any]


def _is_pg() -> bool:
    return connection.vendor == "postgresql"


def _fields(model: type[models.Model], columns: Sequence[str]) -> list[models.Field[Any, Any]]:
    return [_field(model, c) for c in columns]


def _field(model: type[models.Model], name: str) -> models.Field[Any, Any]:
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field


def _copy(
    cursor: Any, table: str, names: str, fields: list[models.Field[Any, Any]], rows: Sequence[Row]
) -> None:
    """COPY rows in text format; JSON columns go as their encoded text."""
    json_columns = [i for i, f in enumerate(fields) if isinstance(f, models.JSONField)]
    encode = msgspec.json.encode
    with cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for row in rows:
            if json_columns:
                row = list(row)
                for i in json_columns:
                    if row[i] is not None:
                        row[i] = encode(row[i]).decode()
            copy.write_row(row)


def _column(field: models.Field[Any, Any]) -> str:
    return connection.ops.quote_name(field.column or field.name)


def _stage(model: type[models.Model], columns: Sequence[str], rows: Sequence[Row]) -> str:
    """COPY rows into a per-connection temporary table shaped like ``model``'s columns."""
    fields = _fields(model, columns)
    table = connection.ops.quote_name(model._meta.db_table)
    names = ", ".join(_column(f) for f in fields)
    tag = hashlib.sha1(f"{model._meta.db_table}:{names}".encode(), usedforsecurity=False)
    stage = f"stage_{tag.hexdigest()[:12]}"
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "  # noqa: S608
            f"SELECT {names} FROM {table} WITH NO DATA"
        )
        cursor.execute(f"TRUNCATE {stage}")
        _copy(cursor, stage, names, fields, rows)
    return stage


COPY_MIN_ROWS = 64  # below this, one multi-row VALUES statement is fewer round trips


def _insert(
    model: type[models.Model], columns: Sequence[str], rows: Sequence[Row], suffix: str
) -> list[Any]:
    """``INSERT INTO table (columns) <rows> <suffix>``; the rows' RETURNING values.

    Rows are inserted in the order given (callers sort them, so concurrent
    inserters take unique-index locks in one order and cannot deadlock).
    """
    if not rows:
        return []
    fields = _fields(model, columns)
    table = connection.ops.quote_name(model._meta.db_table)
    names = ", ".join(_column(f) for f in fields)
    returns = "RETURNING" in suffix
    if _is_pg() and len(rows) >= COPY_MIN_ROWS:
        stage = _stage(model, columns, rows)
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} "  # noqa: S608
                f"ORDER BY ctid {suffix}"
            )
            return [r[0] for r in cursor.fetchall()] if returns else []
    if _is_pg():  # one statement, one array parameter per column
        return _unnest_insert(table, names, fields, rows, suffix, returns)
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
                out += [r[0] for r in cursor.fetchall()]
    return out


def _unnest_insert(
    table: str,
    names: str,
    fields: list[models.Field[Any, Any]],
    rows: Sequence[Row],
    suffix: str,
    returns: bool,
) -> list[Any]:
    columns: list[list[Any]] = [[] for _ in fields]
    json_columns = {i for i, f in enumerate(fields) if isinstance(f, models.JSONField)}
    encode = msgspec.json.encode
    for row in rows:
        for i, value in enumerate(row):
            if i in json_columns and value is not None:
                value = encode(value).decode()
            columns[i].append(value)
    types = [_array_type(f) for f in fields]
    aliases = ", ".join(f"c{i}" for i in range(len(fields)))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({names}) SELECT {aliases} FROM unnest("  # noqa: S608
            + ", ".join(f"%s::{t}[]" for t in types)
            + f") WITH ORDINALITY AS u({aliases}, ord) ORDER BY ord {suffix}",
            columns,
        )
        return [r[0] for r in cursor.fetchall()] if returns else []


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
    returning: str,
) -> list[Any]:
    """INSERT rows, skipping conflicts on ``conflict``; return ``returning`` of the stored ones."""
    on = ", ".join(_column(_field(model, c)) for c in conflict)
    back = _column(_field(model, returning))
    return _insert(model, columns, rows, f"ON CONFLICT ({on}) DO NOTHING RETURNING {back}")


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
    table = connection.ops.quote_name(model._meta.db_table)
    on = ", ".join(_column(_field(model, c)) for c in conflict)
    sets = [f"{_column(f)} = EXCLUDED.{_column(f)}" for f in _fields(model, update)]
    sets += [
        f"{_column(f)} = {table}.{_column(f)} + EXCLUDED.{_column(f)}"
        for f in _fields(model, increment)
    ]
    _insert(model, columns, rows, f"ON CONFLICT ({on}) DO UPDATE SET {', '.join(sets)}")


def append(model: type[models.Model], columns: Sequence[str], rows: Sequence[Row]) -> None:
    """Append rows to an insert-only table."""
    _insert(model, columns, rows, "")
