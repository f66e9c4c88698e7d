"""Hourly saga counts and daily step stats (the 7-day overview), a partial index
for the flag filter, and no separate index on ``Step.saga`` (the unique
(saga, name) constraint serves it). Existing totals are summed into the new
tables."""

from collections import Counter
from datetime import UTC, datetime, timedelta

import django.db.models.deletion
from django.db import migrations, models

_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _floor(at, size):
    return at - ((at - _EPOCH) % size)


def coarse_fill(apps, schema_editor):
    """Sum the existing fine totals into the coarse tables (as rollup_compact will)."""
    alias = schema_editor.connection.alias
    models_ = {
        name: apps.get_model("tracking", name)
        for name in ("SagaCount", "SagaCountHour", "StepStat", "StepStatDay")
    }
    sagas: Counter = Counter()
    for row in models_["SagaCount"].objects.using(alias).iterator(chunk_size=5000):
        bucket = _floor(row.bucket, timedelta(hours=1))
        sagas[(bucket, row.saga_type, row.status, row.flags)] += row.count
    models_["SagaCountHour"].objects.using(alias).bulk_create(
        [
            models_["SagaCountHour"](bucket=b, saga_type=t, status=s, flags=f, count=n)
            for (b, t, s, f), n in sagas.items()
            if n
        ],
        batch_size=2000,
    )
    steps: Counter = Counter()
    failures: Counter = Counter()
    for row in models_["StepStat"].objects.using(alias).iterator(chunk_size=5000):
        key = (_floor(row.bucket, timedelta(days=1)), row.saga_type, row.step, row.bin)
        steps[key] += row.count
        failures[key] += row.failures
    models_["StepStatDay"].objects.using(alias).bulk_create(
        [
            models_["StepStatDay"](
                bucket=b, saga_type=t, step=st, bin=bn, count=n, failures=failures[(b, t, st, bn)]
            )
            for (b, t, st, bn), n in steps.items()
        ],
        batch_size=2000,
    )


class Migration(migrations.Migration):
    dependencies = [
        ("tracking", "0007_saga_id_statistics"),
    ]

    operations = [
        migrations.CreateModel(
            name="SagaCountHour",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("bucket", models.DateTimeField()),
                ("saga_type", models.CharField(blank=True, max_length=100)),
                ("status", models.CharField(max_length=24)),
                ("flags", models.CharField(blank=True, default="", max_length=200)),
                ("count", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.CreateModel(
            name="StepStatDay",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("bucket", models.DateTimeField()),
                ("saga_type", models.CharField(blank=True, max_length=100)),
                ("step", models.CharField(max_length=100)),
                ("bin", models.SmallIntegerField()),
                ("count", models.BigIntegerField(default=0)),
                ("failures", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.AlterField(
            model_name="step",
            name="saga",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="steps",
                to="tracking.saga",
            ),
        ),
        migrations.AddIndex(
            model_name="saga",
            index=models.Index(
                condition=models.Q(("flags", ""), _negated=True),
                fields=["-started_at", "-id"],
                name="saga_flagged_idx",
            ),
        ),
        migrations.AddConstraint(
            model_name="sagacounthour",
            constraint=models.UniqueConstraint(
                fields=("bucket", "saga_type", "status", "flags"), name="saga_count_hour_key"
            ),
        ),
        migrations.AddConstraint(
            model_name="stepstatday",
            constraint=models.UniqueConstraint(
                fields=("bucket", "saga_type", "step", "bin"), name="step_stat_day_key"
            ),
        ),
        migrations.RunPython(coarse_fill, migrations.RunPython.noop),
    ]
