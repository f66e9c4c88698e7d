"""The ASGI fast path of POST /api/v1/events: same answers as the view, group commit."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from tests.conftest import database_away
from tracking.api.fastpath import IngestEndpoint
from tracking.keys import service_key_create, service_key_revoke
from tracking.models import Saga, TelemetryEvent

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def endpoint() -> Any:
    made = IngestEndpoint()
    yield made
    made.batcher.close()


async def call(
    endpoint: IngestEndpoint,
    body: Any,
    *,
    key: str | None,
    method: str = "POST",
    content_type: str = "application/json",
) -> tuple[int, dict[str, str], Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": content_type}
    if key:
        headers["authorization"] = f"Bearer {key}"
    status, head, answer = await asgi_post(endpoint, "/api/v1/events", raw, headers, method=method)
    # every answer carries its length (no chunked encoding: one body write, one client read)
    assert head["content-length"] == str(len(answer))
    return status, head, json.loads(answer)


async def asgi_post(
    endpoint: IngestEndpoint,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    method: str = "POST",
) -> tuple[int, dict[str, str], bytes]:
    """One request straight into the ASGI endpoint: status, headers, raw body."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await endpoint(scope, receive, send)
    head = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], head, sent[1]["body"]


def flush_replace(endpoint: IngestEndpoint, flush: Any) -> None:
    """Make the batcher run ``flush`` (on its flush thread) instead of its own."""
    endpoint.batcher.flush = flush  # type: ignore[method-assign]
    endpoint.batcher._flush = sync_to_async(
        flush, thread_sensitive=False, executor=endpoint.batcher.executor
    )


def event(i: int, saga: str = "fp-1", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"fp-{i}",
        "saga_id": saga,
        "type": "heartbeat",
        "occurred_at": "2026-11-26T10:00:00Z",
        **extra,
    }


def test_concurrent_requests_share_flushes_and_get_their_own_results(endpoint) -> None:
    key = service_key_create(service_name="payment").secret
    flushes = []
    original = endpoint.batcher.flush
    flush_replace(endpoint, lambda batch: (flushes.append(len(batch)), original(batch))[1])

    async def main() -> list[tuple[int, dict[str, str], Any]]:
        requests = []
        for n in range(30):
            events = [event(n * 10 + j, saga=f"fp-{n % 7}") for j in range(n % 3 + 1)]
            if n % 5 == 0:
                events.append(
                    {
                        "id": f"bad-{n}",
                        "saga_id": "x",
                        "type": "nope",
                        "occurred_at": "2026-11-26T10:00:00Z",
                    }
                )
            requests.append(call(endpoint, {"events": events}, key=key))
        return await asyncio.gather(*requests)

    answers = asyncio.run(main())
    for n, (status, _, body) in enumerate(answers):
        assert status == 200
        expected = [
            {"index": j, "id": f"fp-{n * 10 + j}", "status": "accepted"} for j in range(n % 3 + 1)
        ]
        if n % 5 == 0:
            expected.append(
                {
                    "index": n % 3 + 1,
                    "id": f"bad-{n}",
                    "status": "rejected",
                    "errors": body["results"][-1]["errors"],
                }
            )
            assert body["results"][-1]["errors"][0]["field"] == "type"
        assert body["results"] == expected
    assert TelemetryEvent.objects.count() == sum(n % 3 + 1 for n in range(30))
    assert Saga.objects.count() == 7
    assert len(flushes) < 30  # requests were coalesced
    assert sum(flushes) == 30


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"method": "GET"}, 405),
        ({"content_type": "text/plain"}, 415),
        ({"body": b"{not json"}, 400),
        ({"body": {"events": []}}, 400),
        (
            {
                "body": {
                    "id": "only",
                    "saga_id": "s",
                    "type": "nope",
                    "occurred_at": "2026-11-26T10:00:00Z",
                }
            },
            422,
        ),
        ({"key": None}, 401),
        ({"key": "sa_000000000000_unknown"}, 401),
    ],
)
def test_whole_request_errors_match_the_view(endpoint, kwargs, status) -> None:
    key = service_key_create(service_name="payment").secret
    args = {"body": {"events": [event(1)]}, "key": key, **kwargs}
    body = args.pop("body")
    got, headers, answer = asyncio.run(call(endpoint, body, **args))
    assert got == status
    assert headers["content-type"] == "application/problem+json"
    assert answer["status"] == status
    assert TelemetryEvent.objects.count() == 0


def test_a_revoked_key_stops_working_once_the_cache_expires(endpoint) -> None:
    endpoint.keys.ttl = 0
    created = service_key_create(service_name="payment")
    assert asyncio.run(call(endpoint, event(1), key=created.secret))[0] == 200
    service_key_revoke(prefix=created.key.prefix)
    assert asyncio.run(call(endpoint, event(2), key=created.secret))[0] == 401


def test_database_away_is_503(postgres, endpoint) -> None:
    key = service_key_create(service_name="payment").secret
    assert asyncio.run(call(endpoint, event(1), key=key))[0] == 200
    with database_away():
        endpoint.batcher.executor.submit(lambda: connection.close()).result()
        status, headers, _ = asyncio.run(call(endpoint, event(2), key=key))
    assert status == 503
    assert headers["retry-after"] == "5"
    endpoint.batcher.executor.submit(lambda: connection.close()).result()
    assert asyncio.run(call(endpoint, event(3), key=key))[0] == 200


def test_a_backlog_past_the_limit_is_refused_with_429_and_nothing_is_lost(
    service_key: Any,
) -> None:
    """While the database is slow, waiting events pile up; past the limit new requests get
    429 + Retry-After (the reporter retries), and everything accepted is stored."""
    import threading

    endpoint = IngestEndpoint()
    endpoint.batcher.max_backlog = 3
    gate = threading.Event()
    flush = endpoint.batcher.flush

    def slow_flush(batch: Any) -> None:
        gate.wait(10)
        flush(batch)

    flush_replace(endpoint, slow_flush)  # the flush thread now waits for the gate

    async def scenario() -> list[Any]:
        first = asyncio.create_task(call(endpoint, {"events": [event(1)]}, key=service_key.secret))
        await asyncio.sleep(0.1)  # the first flush is running (held at the gate)
        queued = asyncio.create_task(
            call(endpoint, {"events": [event(2), event(3)]}, key=service_key.secret)
        )
        await asyncio.sleep(0.05)
        refused = await call(endpoint, {"events": [event(4), event(5)]}, key=service_key.secret)
        gate.set()
        return [await first, await queued, refused]

    try:
        first, queued, refused = asyncio.run(scenario())
    finally:
        gate.set()
        endpoint.batcher.close()
    assert first[0] == 200 and queued[0] == 200
    status, headers, body = refused
    assert status == 429
    assert headers["retry-after"] == "5"
    assert body["type"].endswith("too-many-requests")
    assert sorted(TelemetryEvent.objects.values_list("event_id", flat=True)) == [
        "fp-1",
        "fp-2",
        "fp-3",
    ]


def test_open_pages_get_the_deltas_of_events_posted_through_the_fast_path(endpoint) -> None:
    # The flush thread hands its push to the server's loop without waiting (live.pushes_on).
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth import get_user_model

    from tests.conftest import role_group
    from tracking.consumers import SagaLiveConsumer

    key = service_key_create(service_name="payment").secret

    def viewer() -> Any:
        user = get_user_model().objects.create_user("fp-watcher", password="pw-watch-123")
        user.groups.add(role_group("viewer"))
        return user

    async def main() -> Any:
        page = WebsocketCommunicator(SagaLiveConsumer.as_asgi(), "/ws/sagas")
        page.scope["user"] = await sync_to_async(viewer)()
        connected, _ = await page.connect()
        assert connected
        status, _, _ = await call(endpoint, {"events": [event(1, saga="fp-live")]}, key=key)
        assert status == 200
        pushed = await page.receive_json_from(timeout=2)
        await page.disconnect()
        return pushed

    pushed = asyncio.run(main())
    assert pushed == {"type": "sagas.changed", "deltas": [{"saga_id": "fp-live", "version": 1}]}


@pytest.mark.parametrize(
    ("linger", "expected_flushes"), [(0.5, [1, 3, 1, 1]), (0.0, [1, 2, 1, 1, 1])]
)
def test_a_flush_lingers_for_the_clients_of_the_last_cycle(
    service_key: Any, linger: float, expected_flushes: list[int]
) -> None:
    """Three reporters took part in a cycle (one flushed, two waiting for it); once the
    first is answered and reports again, the next flush has waited (up to ``linger``)
    for it instead of committing the other two without it."""
    import threading

    endpoint = IngestEndpoint()
    endpoint.batcher.linger = linger
    gate = threading.Event()
    flushes: list[int] = []
    flush = endpoint.batcher.flush

    def counted(batch: Any) -> None:
        gate.wait(10)
        flushes.append(len(batch))
        flush(batch)

    flush_replace(endpoint, counted)

    def post(i: int) -> Any:
        body = {"events": [event(i, saga=f"linger-{i}")]}
        return call(endpoint, body, key=service_key.secret)

    async def scenario() -> list[Any]:
        first = asyncio.create_task(post(0))
        await asyncio.sleep(0.1)  # its flush is running (held at the gate)
        waiting = [asyncio.create_task(post(1)), asyncio.create_task(post(2))]
        await asyncio.sleep(0.05)
        gate.set()
        answered = await first
        await asyncio.sleep(0.05)  # the network and the reporter take a moment
        again = await post(3)  # the first reporter's next report
        await asyncio.sleep(0.6)  # a quiet spell, longer than the linger
        after_quiet = asyncio.create_task(post(4))  # flushed at once: nothing waits for others
        await asyncio.sleep(0.05)
        late = await post(5)
        return [answered, *[await w for w in waiting], again, await after_quiet, late]

    try:
        answers = asyncio.run(scenario())
    finally:
        gate.set()
        endpoint.batcher.close()
    assert [status for status, _, _ in answers] == [200] * 6
    assert flushes == expected_flushes
    assert TelemetryEvent.objects.count() == 6


def test_a_sagas_next_report_through_the_fast_path_extends_its_kept_fold(
    postgres, endpoint, monkeypatch
) -> None:
    """The flush's pipelined transaction commits, its on-commit hooks keep the fold,
    and the saga's next report extends it without reading the store."""
    from tracking import ingest
    from tracking.fold_cache import folds

    key = service_key_create(service_name="payment").secret
    started = event(1, "fp-kept", type="saga.started", saga_type="order", sequence=1)
    assert asyncio.run(call(endpoint, started, key=key))[0] == 200
    assert "fp-kept" in folds
    reads: list[list[str]] = []
    original = ingest.stored_events_get
    monkeypatch.setattr(
        ingest,
        "stored_events_get",
        lambda *, saga_ids: reads.append(saga_ids) or original(saga_ids=saga_ids),
    )
    step = event(2, "fp-kept", type="step.started", step="charge", sequence=2)
    status, _, answer = asyncio.run(call(endpoint, step, key=key))
    assert (status, answer["accepted"]) == (200, 1)
    assert reads == []
    saga = Saga.objects.get(saga_id="fp-kept")
    assert (saga.version, saga.event_count, saga.current_step) == (2, 2, "charge")


def test_resent_events_in_a_pipelined_flush_are_duplicates_and_change_nothing(
    postgres, endpoint
) -> None:
    """The flush folds new sagas assuming every event is new, and locks every saga of
    the batch: resent events must still come back as duplicates, and a saga whose
    events are all resent must not be written."""
    key = service_key_create(service_name="payment").secret
    first = [
        event(1, "fp-a", type="saga.started", saga_type="order", sequence=1),
        event(2, "fp-b", type="saga.started", saga_type="order", sequence=1),
    ]
    status, _, answer = asyncio.run(call(endpoint, {"events": first}, key=key))
    assert (status, answer["accepted"]) == (200, 2)
    versions = dict(Saga.objects.values_list("saga_id", "version"))
    # when both are resent with one new event of saga a and a new saga c
    again = [
        *first,
        event(3, "fp-a", type="step.started", step="charge", sequence=2),
        event(4, "fp-c", type="saga.started", saga_type="order", sequence=1),
    ]
    status, _, answer = asyncio.run(call(endpoint, {"events": again}, key=key))
    # then the resent ones are duplicates, the new ones stored and folded
    assert status == 200
    assert [r["status"] for r in answer["results"]] == [
        "duplicate",
        "duplicate",
        "accepted",
        "accepted",
    ]
    after = dict(Saga.objects.values_list("saga_id", "version"))
    assert after == {"fp-a": versions["fp-a"] + 1, "fp-b": versions["fp-b"], "fp-c": 1}
    assert Saga.objects.get(saga_id="fp-a").current_step == "charge"
    assert TelemetryEvent.objects.count() == 4


def test_a_request_that_breaks_its_group_fails_alone(endpoint, monkeypatch) -> None:
    """An unexpected error in a group commit (a bug, a value the database refuses) costs
    only the request that caused it: the group is stored again one request at a time."""
    from tracking.api import fastpath

    key = service_key_create(service_name="payment").secret
    real = fastpath.events_ingest

    def ingest(*, service: Any, raws: Any) -> Any:
        if any(b"poison" in bytes(raw) for raw in raws):
            raise ValueError("a value the database refuses")
        return real(service=service, raws=raws)

    monkeypatch.setattr(fastpath, "events_ingest", ingest)
    sizes: list[int] = []
    original = endpoint.batcher.flush
    flush_replace(endpoint, lambda batch: (sizes.append(len(batch)), original(batch))[1])

    async def main() -> list[tuple[int, dict[str, str], Any]]:
        requests = [call(endpoint, event(i, saga=f"ok-{i}"), key=key) for i in range(12)]
        requests.insert(5, call(endpoint, event(99, saga="poison"), key=key))
        return await asyncio.gather(*requests)

    answers = asyncio.run(main())
    assert max(sizes) > 1  # the poison shared a flush with others
    statuses = [status for status, _, _ in answers]
    assert statuses.pop(5) == 500
    assert statuses == [200] * 12
    assert TelemetryEvent.objects.filter(saga_id__startswith="ok-").count() == 12
    assert not TelemetryEvent.objects.filter(saga_id="poison").exists()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"occurred_at": "9999-12-31T23:59:59-23:59"}, "occurred_at"),
        ({"occurred_at": "0001-01-01T00:00:00+01:00"}, "occurred_at"),
        ({"occurred_at": "1969-12-31T23:59:59Z"}, "occurred_at"),
        ({"deadline": "9999-12-31T23:59:59.999999Z"}, "deadline"),
        ({"attributes": {"k": "v\u0000"}}, "attributes.k"),
        ({"payload": {"a": [1, {"b\u0000": 2}]}}, "payload.a[1].b"),
        ({"saga_id": "s\u0000"}, "saga_id"),
    ],
)
def test_values_the_database_cannot_hold_are_rejected_naming_the_field(
    endpoint, extra, field
) -> None:
    key = service_key_create(service_name="payment").secret
    events = [event(1, saga="fine"), event(2, saga="bad", **extra), event(3, saga="fine")]
    status, _, answer = asyncio.run(call(endpoint, {"events": events}, key=key))
    assert status == 200
    assert [r["status"] for r in answer["results"]] == ["accepted", "rejected", "accepted"]
    assert answer["results"][1]["errors"][0]["field"] == field
    assert TelemetryEvent.objects.filter(saga_id="fine").count() == 2


def test_invalid_utf8_is_a_malformed_body_or_a_rejected_event(endpoint) -> None:
    key = service_key_create(service_name="payment").secret
    status, head, answer = asyncio.run(call(endpoint, b'{"zz\xff": 1}', key=key))
    assert status == 400 and head["content-type"] == "application/problem+json"
    assert "UTF-8" in answer["detail"]
    good = json.dumps(event(1, saga="fine")).encode()
    body = b'{"events": [' + good + b', {"id": "x", "saga_id": "\xc3\x28"}]}'
    status, _, answer = asyncio.run(call(endpoint, body, key=key))
    assert status == 200
    assert [r["status"] for r in answer["results"]] == ["accepted", "rejected"]
    assert answer["results"][1]["errors"][0]["field"] == "event"


def test_a_literal_backslash_u0000_is_an_ordinary_string(endpoint) -> None:
    key = service_key_create(service_name="payment").secret
    status, _, answer = asyncio.run(
        call(endpoint, event(1, saga="fine", payload={"a": "\\u0000"}), key=key)
    )
    assert status == 200 and answer["results"][0]["status"] == "accepted"
    assert TelemetryEvent.objects.get(saga_id="fine").payload == {"a": "\\u0000"}


def test_a_nul_deep_in_a_deeply_nested_payload_is_rejected_not_a_500(endpoint) -> None:
    key = service_key_create(service_name="payment").secret
    deep: Any = "\u0000"
    for _ in range(2000):
        deep = [deep]
    events = [event(1, saga="fine"), event(2, saga="bad", payload={"a": deep})]
    status, _, answer = asyncio.run(call(endpoint, {"events": events}, key=key))
    assert status == 200
    assert [r["status"] for r in answer["results"]] == ["accepted", "rejected"]
    assert answer["results"][1]["errors"][0]["field"].startswith("payload.a[0]")


def test_a_group_that_committed_is_not_stored_again_when_a_hook_fails(
    endpoint, monkeypatch
) -> None:
    """A failure after the commit (an on-commit hook) must not send the requests through
    the one-by-one retry: they were stored; a retry would answer 'duplicate'."""
    from django.db import transaction

    from tracking.api import fastpath

    key = service_key_create(service_name="payment").secret
    real = fastpath.events_ingest
    calls: list[int] = []

    def ingest(*, service: Any, raws: Any) -> Any:
        calls.append(len(raws))
        result = real(service=service, raws=raws)
        transaction.on_commit(lambda: 1 / 0)  # a hook that breaks after the commit
        return result

    monkeypatch.setattr(fastpath, "events_ingest", ingest)
    sizes: list[int] = []
    original = endpoint.batcher.flush
    flush_replace(endpoint, lambda batch: (sizes.append(len(batch)), original(batch))[1])

    async def main() -> list[tuple[int, dict[str, str], Any]]:
        return await asyncio.gather(
            *(call(endpoint, event(i, saga=f"ok-{i}"), key=key) for i in range(6))
        )

    answers = asyncio.run(main())
    assert max(sizes) > 1
    assert len(calls) == len(sizes)  # one ingest per flush: nothing retried
    assert {status for status, _, _ in answers} == {500}
    assert TelemetryEvent.objects.filter(saga_id__startswith="ok-").count() == 6
