"""Admins edit saga-type thresholds; sagas stored before detection existed are due once.

(docs/detection.md) Open and failed sagas get ``watch_at`` = now, so the
detector's first pass looks at each once; settled ones never need it.
"""

from django.contrib.auth.management import create_permissions
from django.db import migrations
from django.utils import timezone


def forwards(apps, schema_editor):
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, verbosity=0, apps=apps)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name="admin")
    group.permissions.add(
        Permission.objects.get(content_type__app_label="tracking", codename="edit_thresholds")
    )

    apps.get_model("tracking", "Saga").objects.exclude(
        status__in=["completed", "compensated", "cancelled"]
    ).update(watch_at=timezone.now())


def backwards(apps, schema_editor):
    Permission = apps.get_model("auth", "Permission")
    for group in apps.get_model("auth", "Group").objects.filter(name="admin"):
        group.permissions.remove(
            *Permission.objects.filter(
                content_type__app_label="tracking", codename="edit_thresholds"
            )
        )


class Migration(migrations.Migration):
    dependencies = [("tracking", "0009_detection")]
    operations = [migrations.RunPython(forwards, backwards)]
