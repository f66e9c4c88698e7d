"""The webhook transport against a real HTTP server: signatures, order, retries, poison, away."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import transaction

import outbox
from outbox.models import OutboxMessage
from outbox.relay import RelaySettings
from outbox.transports import transport_from_url
from outbox.transports.base import Outgoing, Permanent, Skipped, TransportError
from outbox.transports.webhook import WebhookTransport, subscriptions_from_setting
from tests.outbox.helpers import dead_port, relay_through

CFG = RelaySettings(batch_size=100, max_attempts=5, backoff_base=0.0, backoff_max=0.0)
SECRETS = {"/a": "secret-a", "/b": "secret-b"}
pytestmark = pytest.mark.django_db(transaction=True)


def verify_sagaadmin_webhook(secret: str, headers, body: bytes, tolerance: int = 300) -> bool:
    """True when the request was signed with ``secret`` within ``tolerance`` seconds.

    Copied verbatim from docs/outbox-transports.md: the tests check the recipe.
    """
    timestamp = headers.get("X-Sagaadmin-Timestamp", "")
    signature = headers.get("X-Sagaadmin-Signature", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(f"sha256={expected.hexdigest()}", signature)


verify = verify_sagaadmin_webhook


@dataclass
class Receiver:
    """What a subscriber's server saw and how it answers: 401 for a bad signature,
    400 for a payload containing "poison", the statuses in ``answers`` first, else 200."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    delay: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self, path: str = "/a") -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path and r["status"] == 200]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(receiver.delay)
            with receiver.lock:
                if not verify(SECRETS[self.path], self.headers, body):
                    status = 401
                elif b"poison" in body:
                    status = 400
                elif receiver.answers:
                    status = receiver.answers.pop(0)
                else:
                    status = 200
                receiver.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                        "status": status,
                    }
                )
            reply = b"poison refused" if status == 400 else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def topic() -> str:
    return f"test.outbox.{uuid.uuid4().hex[:8]}"


def _subscribe(settings: Any, topic: str, *urls: str) -> None:
    """OUTBOX_WEBHOOKS as an operator writes it: topic -> [{url, secret}]."""
    settings.OUTBOX_WEBHOOKS = {
        topic: [{"url": url, "secret": SECRETS[url[url.rindex("/") :]]} for url in urls]
    }


def _relay(url: str = "webhook://?timeout=5", *, once: bool = False) -> Any:
    return relay_through(url, CFG, once=once)


def test_the_relay_posts_signed_messages_to_every_subscriber_in_key_order(
    receiver, topic, settings
) -> None:
    _subscribe(settings, topic, f"{receiver.url}/a", f"{receiver.url}/b")
    with transaction.atomic():
        for i in range(3):
            outbox.publish(
                topic=topic, key="order-7", type="payment.charge", payload={"i": i}, version=2
            )
        outbox.publish(topic=topic, key="order-8", type="stock.reserve", payload={"sku": "A"})

    result = _relay()

    assert (result.published, result.retried) == (4, 0)
    stored = list(OutboxMessage.objects.order_by("seq"))
    assert {s.status for s in stored} == {"published"}
    for path in ("/a", "/b"):
        got = receiver.delivered(path)
        assert len(got) == 4
        key7 = [r for r in got if r["headers"]["X-Sagaadmin-Key"] == "order-7"]
        assert [r["body"] for r in key7] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
        assert [r["headers"]["X-Sagaadmin-Id"] for r in key7] == [
            str(s.message_id) for s in stored[:3]
        ]
        # each subscriber's own secret signed its copy
        assert all(verify(SECRETS[path], r["headers"], r["body"]) for r in got)
        assert not any(verify("wrong-secret", r["headers"], r["body"]) for r in got)
    # keys are sent side by side: take order-7's first message, not the first to arrive
    first = next(r for r in receiver.delivered("/a") if r["body"] == b'{"i":0}')["headers"]
    assert first["Content-Type"] == "application/json"
    assert first["X-Sagaadmin-Type"] == "payment.charge"
    assert first["X-Sagaadmin-Version"] == "2"
    assert abs(int(first["X-Sagaadmin-Timestamp"]) - time.time()) < 60
    assert first["X-Sagaadmin-Signature"].startswith("sha256=")
    other = next(r for r in receiver.delivered("/a") if r["body"] == b'{"sku":"A"}')
    assert other["headers"]["X-Sagaadmin-Id"] == str(stored[3].message_id)
    assert other["headers"]["X-Sagaadmin-Version"] == "1"


def test_a_5xx_is_retried_and_holds_the_rest_of_its_key_back(receiver, topic, settings) -> None:
    _subscribe(settings, topic, f"{receiver.url}/a")
    receiver.answers = [500]
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x", payload={"n": 1})
        outbox.publish(topic=topic, key="k", type="x", payload={"n": 2})

    result = _relay(once=True)

    assert (result.published, result.retried, result.skipped) == (0, 1, 1)
    first, second = OutboxMessage.objects.order_by("seq")
    assert (first.status, first.attempts) == ("pending", 1)
    assert first.last_error.startswith("TransportError: webhook ")
    assert "answered 500" in first.last_error
    assert (second.status, second.attempts) == ("pending", 0)
    assert [r["body"] for r in receiver.requests] == [b'{"n":1}']  # the second was not sent

    assert _relay().published == 2

    assert [r["body"] for r in receiver.delivered()] == [b'{"n":1}', b'{"n":2}']
    ids = [r["headers"]["X-Sagaadmin-Id"] for r in receiver.requests]
    assert ids[0] == ids[1] == str(first.message_id)  # the retry is the same message
    assert {m.status for m in OutboxMessage.objects.all()} == {"published"}


def test_a_4xx_is_permanent_the_poison_message_is_dead_and_its_key_goes_on(
    receiver, topic, settings
) -> None:
    _subscribe(settings, topic, f"{receiver.url}/a")
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x", payload={"poison": True})
        outbox.publish(topic=topic, key="k", type="x", payload={"n": 2})
        outbox.publish(topic=topic, key="other", type="x", payload={"n": 3})

    result = _relay(once=True)

    poison, held, other = OutboxMessage.objects.order_by("seq")
    assert (result.published, result.dead, result.skipped) == (1, 1, 1)
    assert (poison.status, poison.attempts) == ("dead", 1)
    assert poison.last_error.startswith("Permanent: webhook ")
    assert "answered 400 Bad Request: poison refused" in poison.last_error
    assert (held.status, held.attempts) == ("pending", 0)
    assert other.status == "published"

    assert _relay().published == 1
    assert [r["body"] for r in receiver.delivered()] == [b'{"n":3}', b'{"n":2}']


def test_with_the_receiver_away_messages_wait_and_go_when_it_returns(
    receiver, topic, settings
) -> None:
    away = f"http://127.0.0.1:{dead_port()}/a"
    _subscribe(settings, topic, away)
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x.y", payload={"n": 1})

    result = _relay(once=True)

    assert (result.published, result.retried) == (0, 1)
    message = OutboxMessage.objects.get()
    assert message.status == "pending" and message.attempts == 1
    assert message.last_error.startswith(f"TransportError: webhook {away} unreachable: Connection")

    _subscribe(settings, topic, f"{receiver.url}/a")
    assert _relay().published == 1
    assert [r["body"] for r in receiver.delivered()] == [b'{"n":1}']
    assert OutboxMessage.objects.get().status == "published"


def test_a_receiver_slower_than_the_timeout_is_a_failure(receiver, topic, settings) -> None:
    _subscribe(settings, topic, f"{receiver.url}/a")
    receiver.delay = 1.0
    with transaction.atomic():
        outbox.publish(topic=topic, key="k", type="x", payload={"n": 1})

    started = time.monotonic()
    result = _relay("webhook://?timeout=0.3", once=True)

    assert time.monotonic() - started < 0.9
    assert (result.published, result.retried) == (0, 1)
    assert OutboxMessage.objects.get().last_error.endswith("timed out after 0.3 s")


def _outgoing(topic: str, **fields: Any) -> Outgoing:
    return Outgoing(
        id=uuid.uuid4(), topic=topic, key="k", type="x", version=1, payload=b"{}", **fields
    )


def test_429_is_retried_and_a_topic_without_subscribers_is_confirmed(receiver, topic) -> None:
    receiver.answers = [429]
    transport = WebhookTransport(
        subscriptions_from_setting({topic: [{"url": f"{receiver.url}/a", "secret": "secret-a"}]})
    )
    try:
        throttled, nobody = transport.publish([_outgoing(topic), _outgoing("unsubscribed")])
        assert isinstance(throttled, TransportError)
        assert not isinstance(throttled, Permanent | Skipped)
        assert nobody is None
        assert transport.publish([_outgoing(topic)]) == [None]
    finally:
        transport.close()


def test_webhook_configuration_errors_name_the_setting(settings) -> None:
    with pytest.raises(ValueError, match=r"OUTBOX_WEBHOOKS\['orders'\]\[0\]\.url"):
        subscriptions_from_setting({"orders": [{"url": "ftp://x", "secret": "s"}]})
    with pytest.raises(ValueError, match=r"OUTBOX_WEBHOOKS\['orders'\]\[0\]\.secret"):
        subscriptions_from_setting({"orders": [{"url": "https://x.example/h"}]})
    with pytest.raises(ValueError, match="webhook:// takes no host"):
        transport_from_url("webhook://somewhere")
    settings.OUTBOX_WEBHOOKS = {}
    with pytest.raises(ValueError, match="options are timeout and workers"):
        transport_from_url("webhook://?retries=3")
    with pytest.raises(ValueError, match=r"supported: .*redis://.*nats://.*webhook://"):
        transport_from_url("kafka://localhost")
