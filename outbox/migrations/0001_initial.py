from django.db import migrations, models

import outbox.ids


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="InboxMessage",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("consumer", models.CharField(max_length=200)),
                ("message_id", models.CharField(max_length=200)),
                ("received_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(fields=("consumer", "message_id"), name="inbox_once")
                ],
            },
        ),
        migrations.CreateModel(
            name="OutboxMessage",
            fields=[
                ("seq", models.BigAutoField(primary_key=True, serialize=False)),
                (
                    "message_id",
                    models.UUIDField(
                        db_column="id", default=outbox.ids.uuid7, editable=False, unique=True
                    ),
                ),
                ("aggregatetype", models.CharField(max_length=200, verbose_name="topic")),
                ("aggregateid", models.CharField(max_length=200, verbose_name="ordering key")),
                ("type", models.CharField(max_length=200)),
                ("version", models.PositiveIntegerField(default=1)),
                ("payload", models.TextField()),
                ("headers", models.JSONField(blank=True, default=dict)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("available_at", models.DateTimeField()),
                ("attempts", models.PositiveIntegerField(default=0)),
                ("last_error", models.TextField(blank=True, default="")),
                ("published_at", models.DateTimeField(blank=True, null=True)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("pending", "Pending"),
                            ("published", "Published"),
                            ("dead", "Dead"),
                        ],
                        default="pending",
                        max_length=16,
                    ),
                ),
            ],
            options={
                "indexes": [
                    models.Index(
                        condition=models.Q(("status", "pending")),
                        fields=["seq"],
                        name="outbox_pending_idx",
                    ),
                    models.Index(
                        condition=models.Q(("status", "pending")),
                        fields=["aggregatetype", "aggregateid", "seq"],
                        name="outbox_pending_key_idx",
                    ),
                    models.Index(fields=["status", "published_at"], name="outbox_status_idx"),
                ],
            },
        ),
    ]
