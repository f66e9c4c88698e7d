"""Indexes only PostgreSQL has: GIN on business attributes, a prefix index on saga ids."""

from django.db import migrations

INDEXES = [
    (
        "CREATE INDEX IF NOT EXISTS saga_attributes_gin ON tracking_saga "
        "USING gin (attributes jsonb_path_ops)",
        "DROP INDEX IF EXISTS saga_attributes_gin",
    ),
    (
        "CREATE INDEX IF NOT EXISTS saga_id_prefix_idx ON tracking_saga "
        "(saga_id varchar_pattern_ops)",
        "DROP INDEX IF EXISTS saga_id_prefix_idx",
    ),
]


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for create, _ in INDEXES:
            schema_editor.execute(create)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for _, drop in INDEXES:
            schema_editor.execute(drop)


class Migration(migrations.Migration):
    dependencies = [("tracking", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
