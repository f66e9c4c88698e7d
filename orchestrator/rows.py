"""Writing many changed rows of one model in one statement (a transition group's runs and steps).

On PostgreSQL the rows travel as one JSON parameter unpacked by
``jsonb_to_recordset`` (a column per field, cast to the field's database
type): one ``UPDATE … FROM`` whatever the number of rows, and no per-value
work in Python beyond encoding the JSON. Elsewhere (SQLite, the embedded
default) one ``UPDATE`` per row. The caller holds the rows' locks; rows are
written in primary-key order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import msgspec
from django.db import connection, models


def _columns(model: type[models.Model], names: Sequence[str]) -> list[tuple[str, str]]:
    """(column, database type) of the model's primary key, then of the fields named."""
    meta = model._meta
    out = []
    for field in [meta.pk, *(meta.get_field(name) for name in names)]:
        assert isinstance(field, models.Field) and field.column
        out.append((field.column, str(field.db_type(connection))))
    return out


@functools.cache
def _update_sql(model: type[models.Model], names: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    key, *fields = _columns(model, names)
    pk = key[0]
    sets = ", ".join(f"{quote(c)} = v.{quote(c)}" for c, _ in fields)
    shape = ", ".join(f"{quote(c)} {t}" for c, t in [key, *fields])
    return (
        f"UPDATE {quote(model._meta.db_table)} AS t SET {sets} "  # noqa: S608 (names from the model, values bound)
        f"FROM jsonb_to_recordset(%s::jsonb) AS v({shape}) "
        f"WHERE t.{quote(pk)} = v.{quote(pk)}"
    )


def rows_update(
    model: type[models.Model], objs: Sequence[models.Model], names: Sequence[str]
) -> None:
    """Write the fields ``names`` of ``objs`` (rows that exist) to the database."""
    if not objs:
        return
    ordered = sorted(objs, key=lambda o: o.pk)
    if connection.vendor != "postgresql":
        for obj in ordered:
            model._default_manager.filter(pk=obj.pk).update(**{n: getattr(obj, n) for n in names})
        return
    columns = [c for c, _ in _columns(model, names)]
    rows = [
        dict(zip(columns, (obj.pk, *(getattr(obj, n) for n in names)), strict=True))
        for obj in ordered
    ]
    with connection.cursor() as cursor:
        cursor.execute(_update_sql(model, tuple(names)), [msgspec.json.encode(rows).decode()])
