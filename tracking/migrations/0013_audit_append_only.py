"""The audit log is append-only: on PostgreSQL a trigger refuses UPDATE and DELETE.

(TRUNCATE stays possible for the table owner: test databases are flushed with it.)
"""

from django.db import migrations

FORWARD = """
CREATE FUNCTION tracking_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: %% refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER tracking_audit_append_only
    BEFORE UPDATE OR DELETE ON tracking_auditentry
    FOR EACH ROW EXECUTE FUNCTION tracking_audit_append_only();
"""
BACKWARD = """
DROP TRIGGER tracking_audit_append_only ON tracking_auditentry;
DROP FUNCTION tracking_audit_append_only();
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORWARD)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACKWARD)


class Migration(migrations.Migration):
    dependencies = [("tracking", "0012_operator_actions")]
    operations = [migrations.RunPython(forwards, backwards)]
