"""Helpers shared by the transport tests."""

from __future__ import annotations

import socket


def wait_until_claimable(timeout: float = 30.0) -> None:
    """Kept for the transport tests' call sites: committed rows are claimable at once
    (the relay no longer waits for a transaction horizon), so there is nothing to wait for."""


def dead_port() -> int:
    """A local port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
