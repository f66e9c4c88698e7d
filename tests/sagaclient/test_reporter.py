"""sagaclient against a real HTTP server that fails and recovers, and against Saga Admin itself."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sagaclient import InvalidSignature, Reporter, command_verify, signature_valid


class Server:
    """Records delivered events; answers the statuses in ``answers`` first, then 200."""

    def __init__(self, port: int = 0) -> None:
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.events: list[dict[str, Any]] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                status, headers = outer.answers.pop(0) if outer.answers else (200, {})
                if status == 200:
                    assert self.headers["Authorization"] == "Bearer k-1"
                    outer.events += json.loads(body)["events"]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_saga_with_steps_is_reported_in_order(server: Server) -> None:
    with Reporter(server.url, "k-1", service="order", flush_interval=0.05) as reporter:
        with reporter.saga("o-1", "order", attributes={"order_id": 1}) as saga:
            with saga.step("charge", idempotency_key="o-1:charge:1"):
                pass
            with pytest.raises(ValueError), saga.step("reserve"):
                raise ValueError("out of stock")
            with saga.compensation("charge"):
                pass
            saga.end("saga.compensated")
        assert reporter.flush(5)
    types = [(e["type"], e.get("step", "")) for e in server.events]
    assert types == [
        ("saga.started", ""),
        ("step.started", "charge"),
        ("step.succeeded", "charge"),
        ("step.started", "reserve"),
        ("step.failed", "reserve"),
        ("compensation.started", "charge"),
        ("compensation.succeeded", "charge"),
        ("saga.compensated", ""),
    ]
    sequences = [e["sequence"] for e in server.events]
    assert sequences == sorted(set(sequences))  # strictly increasing
    assert abs(sequences[0] - time.time_ns() // 1000) < 60_000_000  # microseconds, from now
    failed = server.events[4]
    assert failed["error"] == {"type": "ValueError", "message": "out of stock"}
    assert server.events[0]["attributes"] == {"order_id": 1}
    assert {e["service"] for e in server.events} == {"order"}


def test_503_and_429_are_retried_honouring_retry_after(server: Server) -> None:
    server.answers = [(503, {"Retry-After": "0"}), (429, {"Retry-After": "0"})]
    reporter = Reporter(server.url, "k-1", flush_interval=0.05)
    ids = [reporter.event("heartbeat", "s-1") for _ in range(5)]
    assert reporter.flush(5)
    reporter.close()
    assert [e["id"] for e in server.events] == ids
    assert reporter.stats["retried"] == 2 and reporter.stats["sent"] == 5


def test_a_server_away_then_back_loses_nothing() -> None:
    port = free_port()
    reporter = Reporter(f"http://127.0.0.1:{port}", "k-1", flush_interval=0.05, max_backoff=0.2)
    ids = [reporter.event("heartbeat", "s-2") for _ in range(3)]
    time.sleep(0.3)  # it is failing to connect by now
    assert reporter.stats["retried"] >= 1
    back = Server(port)  # the server recovers
    try:
        assert reporter.flush(10)
        assert [e["id"] for e in back.events] == ids
    finally:
        reporter.close()
        back.stop()


def test_what_cannot_be_sent_is_spooled_and_sent_after_a_restart(tmp_path: Path) -> None:
    spool = tmp_path / "sagaadmin.spool"
    port = free_port()
    first = Reporter(f"http://127.0.0.1:{port}", "k-1", spool_path=str(spool), max_backoff=0.1)
    ids = [first.event("heartbeat", "s-3") for _ in range(4)]
    first.close(timeout=0.5)  # the server never answered: everything goes to the file
    assert len(spool.read_text().splitlines()) == 4

    server = Server(port)
    try:
        second = Reporter(server.url, "k-1", spool_path=str(spool), flush_interval=0.05)
        assert second.flush(5)
        second.close()
        assert [e["id"] for e in server.events] == ids
        assert not spool.exists()
    finally:
        server.stop()


def test_a_full_queue_spools_and_nothing_raises_into_the_caller(
    server: Server, tmp_path: Path
) -> None:
    spool = tmp_path / "q.spool"
    reporter = Reporter(server.url, "k-1", queue_size=2, spool_path=str(spool), start=False)
    for _ in range(5):
        reporter.event("heartbeat", "s-4")
    assert reporter.stats["spooled"] == 3
    reporter.event("heartbeat", "s-4", attributes={"bad": object()})  # not JSON: logged, no raise


def test_a_refused_batch_is_dropped_not_retried_forever(server: Server) -> None:
    server.answers = [(401, {})]
    reporter = Reporter(server.url, "k-1", flush_interval=0.05)
    reporter.event("heartbeat", "s-5")
    assert reporter.flush(5)
    reporter.close()
    assert reporter.stats["refused"] == 1 and server.requests == 1


def test_command_signatures() -> None:
    from outbox.transports.webhook import signature

    body = json.dumps({"command_id": "c-1", "action": "retry_step"}).encode()
    stamp = str(int(time.time()))
    headers = {
        "X-Sagaadmin-Timestamp": stamp,
        "X-Sagaadmin-Signature": signature("s3cret", stamp, body),
    }
    assert signature_valid("s3cret", headers, body)
    assert command_verify("s3cret", headers, body)["command_id"] == "c-1"
    assert not signature_valid("other", headers, body)
    assert not signature_valid("s3cret", headers, body + b" ")
    old = {**headers, "X-Sagaadmin-Timestamp": str(int(time.time()) - 3600)}
    assert not signature_valid("s3cret", old, body)
    with pytest.raises(InvalidSignature):
        command_verify("other", headers, body)


@pytest.mark.django_db(transaction=True)
def test_it_reports_to_saga_admin_itself(live_server: Any) -> None:
    from tracking.keys import service_key_create
    from tracking.models import Saga

    key = service_key_create(service_name="order").secret
    with Reporter(live_server.url, key, flush_interval=0.05) as reporter:
        with (
            reporter.saga("live-1", "order", attributes={"order_id": 7}) as saga,
            saga.step("charge"),
        ):
            pass
        assert reporter.flush(10)
        assert reporter.stats["sent"] == 4 and reporter.stats["refused"] == 0
    stored = Saga.objects.get(saga_id="live-1")
    assert (stored.status, stored.saga_type, stored.attributes) == (
        "completed",
        "order",
        {"order_id": 7},
    )
