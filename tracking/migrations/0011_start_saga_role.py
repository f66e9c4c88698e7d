"""Admins start orchestrated sagas (``orchestrator.start_saga``, docs/dashboard.md)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations


def forwards(apps, schema_editor):
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, verbosity=0, apps=apps)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name="admin")
    group.permissions.add(
        Permission.objects.get(content_type__app_label="orchestrator", codename="start_saga")
    )


def backwards(apps, schema_editor):
    Permission = apps.get_model("auth", "Permission")
    for group in apps.get_model("auth", "Group").objects.filter(name="admin"):
        group.permissions.remove(
            *Permission.objects.filter(
                content_type__app_label="orchestrator", codename="start_saga"
            )
        )


class Migration(migrations.Migration):
    dependencies = [("tracking", "0010_threshold_role"), ("orchestrator", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
