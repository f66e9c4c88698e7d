"""Transactional outbox: ``publish()`` in the caller's transaction, a relay to the broker.

See docs/outbox.md. ``outbox.publish`` is importable before Django's app
registry is ready; it loads the model on first call.
"""

from __future__ import annotations

from typing import Any


def publish(**kwargs: Any) -> Any:
    """Queue a message in the current transaction; see :func:`outbox.api.publish`."""
    from outbox.api import publish as _publish

    return _publish(**kwargs)
