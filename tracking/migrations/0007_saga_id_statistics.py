"""PostgreSQL: steadier plans for saga-id prefix filters, one prefix index instead of two.

With default statistics the planner misjudged ~8 % of prefixes and walked the
start-time index instead of the prefix index (bench/queries.py); Django's own
``..._like`` index already serves ``LIKE 'prefix%'``, so 0002's copy goes.
"""

from django.db import migrations


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP INDEX IF EXISTS saga_id_prefix_idx")
        schema_editor.execute("ALTER TABLE tracking_saga ALTER COLUMN saga_id SET STATISTICS 1000")


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE tracking_saga ALTER COLUMN saga_id SET STATISTICS -1")
        schema_editor.execute(
            "CREATE INDEX IF NOT EXISTS saga_id_prefix_idx ON tracking_saga "
            "(saga_id varchar_pattern_ops)"
        )


class Migration(migrations.Migration):
    dependencies = [("tracking", "0006_event_service_received_index")]
    operations = [migrations.RunPython(forwards, backwards)]
