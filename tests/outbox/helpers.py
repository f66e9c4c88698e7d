"""Helpers shared by the transport tests."""

from __future__ import annotations

import socket
from typing import Any


def dead_port() -> int:
    """A local port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def relay_through(url: str, cfg: Any, *, once: bool = False) -> Any:
    """One batch (``once``: a retry stays failed) or a drain, through a fresh transport."""
    from outbox.relay import Relay
    from outbox.transports import transport_from_url

    transport = transport_from_url(url)
    try:
        relay = Relay(transport, cfg)
        return relay.run_once() if once else relay.drain()
    finally:
        transport.close()
