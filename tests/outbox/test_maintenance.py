"""Retention, requeue (command and dashboard), the outbox page."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone

import outbox
from outbox.maintenance import dead_requeue, outbox_stats, published_delete
from outbox.models import OutboxMessage


def make(n: int, status: str, **extra: object) -> list[OutboxMessage]:
    with transaction.atomic():
        out = [
            outbox.publish(topic="t", key=f"k{i}", type="x.y", payload={"i": i}) for i in range(n)
        ]
    OutboxMessage.objects.filter(seq__in=[m.seq for m in out]).update(status=status, **extra)
    return out


def test_retention_deletes_old_published_messages_only(db) -> None:
    old = timezone.now() - timedelta(days=10)
    make(7, "published", published_at=old)
    make(2, "published", published_at=timezone.now())
    make(3, "dead", last_error="boom")
    assert published_delete(older_than=timedelta(days=7), batch_size=3) == 7
    assert outbox_stats().published == 2
    assert outbox_stats().dead == 3


def test_requeue_by_id_and_by_filter(db) -> None:
    dead = make(3, "dead", attempts=10, last_error="boom")
    assert dead_requeue() == 0  # no selector: nothing
    assert dead_requeue(message_ids=[str(dead[0].message_id)]) == 1
    again = OutboxMessage.objects.get(seq=dead[0].seq)
    assert (again.status, again.attempts) == ("pending", 0)
    out = StringIO()
    call_command("outbox_requeue", "--type", "x.y", stdout=out)
    assert out.getvalue().strip() == "requeued 2 dead messages"
    with pytest.raises(CommandError, match="say which messages"):
        call_command("outbox_requeue")
    with pytest.raises(CommandError, match=r"^ids: "):
        call_command("outbox_requeue", "not-a-uuid")


def test_the_outbox_page_shows_counts_and_lets_operators_requeue(role_client) -> None:
    dead = make(1, "dead", attempts=10, last_error="RuntimeError: <b>boom</b>")
    make(2, "pending")
    viewer = role_client("viewer")
    html = viewer.get("/outbox/").content.decode()
    assert "<dt>Pending</dt><dd>2</dd>" in html and "<dt>Dead</dt><dd>1</dd>" in html
    assert "RuntimeError: &lt;b&gt;boom&lt;/b&gt;" in html
    assert "Requeue</button>" not in html  # viewers look only
    assert viewer.post("/outbox/requeue", {"id": str(dead[0].message_id)}).status_code == 403
    operator = role_client("operator")
    bad = operator.post("/outbox/requeue", {"id": "nope"})
    assert bad.status_code == 400 and "id: not a message id" in bad.content.decode()
    response = operator.post("/outbox/requeue", {"id": str(dead[0].message_id)})
    assert response.status_code == 302
    assert "Requeued 1 message." in operator.get("/outbox/").content.decode()
    assert OutboxMessage.objects.get(seq=dead[0].seq).status == "pending"
