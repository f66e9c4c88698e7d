"""publish(): inside the caller's transaction only, canonical payload, clear errors."""

from __future__ import annotations

import pytest
from django.db import connection, transaction

import outbox
from outbox.api import OutsideTransaction
from outbox.ids import uuid7
from outbox.models import OutboxMessage


@pytest.mark.django_db(transaction=True)  # autocommit, as in a view without atomic()
def test_publish_outside_a_transaction_is_refused() -> None:
    with pytest.raises(OutsideTransaction, match=r"inside transaction\.atomic\(\)"):
        outbox.publish(topic="t", key="k", type="x", payload={})
    assert OutboxMessage.objects.count() == 0


def test_the_message_rolls_back_with_the_change(db) -> None:
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        outbox.publish(topic="t", key="k", type="x", payload={"a": 1})
        1 / 0  # noqa: B018 - the change fails after the publish
    assert OutboxMessage.objects.count() == 0


def test_the_payload_is_encoded_once_canonically(db) -> None:
    with transaction.atomic():
        first = outbox.publish(topic="t", key="k", type="x", payload={"b": [1, 2], "a": "é"})
        second = outbox.publish(topic="t", key="k", type="x", payload={"a": "é", "b": [1, 2]})
    stored = list(OutboxMessage.objects.order_by("seq").values_list("payload", flat=True))
    assert stored == ['{"a":"é","b":[1,2]}'] * 2
    assert first.message_id < second.message_id  # time-ordered ids
    assert first.status == "pending" and first.version == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"topic": ""}, "topic"),
        ({"key": "k" * 201}, "key"),
        ({"type": None}, "type"),
        ({"version": 0}, "version"),
        ({"payload": {"x": object()}}, "payload"),
    ],
)
def test_bad_arguments_name_the_field(db, kwargs, field) -> None:
    args = {"topic": "t", "key": "k", "type": "x", "payload": {}} | kwargs
    with transaction.atomic(), pytest.raises(ValueError, match=f"^{field}: "):
        outbox.publish(**args)


def test_ids_are_version_7_and_strictly_increasing() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {7}


def test_publish_is_a_prepared_statement_on_postgresql(postgres) -> None:
    # given DATABASE_PREPARE_THRESHOLD (5): Django's own cursors never prepare
    # when one connection publishes more often than the threshold
    with transaction.atomic():
        for i in range(8):
            outbox.publish(topic="t", key=f"k{i}", type="x", payload={"i": i})
    # then the insert is prepared on it (parsed and planned once, not per message)
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [row[0] for row in cursor.fetchall()]
    assert any("INSERT INTO outbox_outboxmessage" in s for s in statements), statements
    assert OutboxMessage.objects.filter(aggregatetype="t").count() == 8
