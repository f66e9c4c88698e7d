"""The inbox: a redelivered message changes nothing the second time."""

from __future__ import annotations

import pytest

from outbox.inbox import Incoming, inbox_apply
from outbox.models import InboxMessage

MESSAGE = Incoming(id="m-1", topic="t", key="k", type="x", version=1, payload={"n": 1})


def test_a_message_is_applied_once_per_consumer(db) -> None:
    applied: list[str] = []
    assert inbox_apply("billing", MESSAGE, lambda m: applied.append(m.id)) is True
    assert inbox_apply("billing", MESSAGE, lambda m: applied.append(m.id)) is False
    assert inbox_apply("shipping", MESSAGE, lambda m: applied.append(m.id)) is True
    assert applied == ["m-1", "m-1"]
    assert InboxMessage.objects.count() == 2


def test_a_failing_handler_leaves_no_record_so_the_redelivery_runs(db) -> None:
    def fail(_: Incoming) -> None:
        raise RuntimeError("downstream away")

    with pytest.raises(RuntimeError):
        inbox_apply("billing", MESSAGE, fail)
    assert not InboxMessage.objects.exists()
    assert inbox_apply("billing", MESSAGE, lambda m: None) is True
