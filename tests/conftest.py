"""Shared fixtures: service keys, an API client, an event factory, real-service gates."""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from tracking.keys import CreatedKey, service_key_create

REQUIRE_SERVICES = os.environ.get("SAGAADMIN_REQUIRE_SERVICES") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip with a visible reason, or fail when CI requires every service."""
    if condition:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable (SAGAADMIN_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(reason)


def pg_activity_wait(condition: str, timeout: float = 10.0) -> bool:
    """Poll ``pg_stat_activity`` (on this thread's connection) until a backend matches
    ``condition`` (SQL over its columns); False if none did within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {condition}")  # noqa: S608
            if cursor.fetchone()[0]:
                return True
            time.sleep(0.01)
    return False


@pytest.fixture(autouse=True)
def _fold_cache_empty() -> Iterator[None]:
    """Each test starts with no kept saga folds (tracking/fold_cache.py): the database
    is emptied between tests, under the process's cache."""
    from tracking.fold_cache import folds

    folds.clear()
    yield
    folds.clear()


@pytest.fixture
def postgres(db: None) -> None:
    need(
        connection.vendor == "postgresql",
        "needs PostgreSQL: run with DATABASE_URL=postgres://... (the suite is on "
        f"{connection.vendor})",
    )


@pytest.fixture
def service_key(db: None) -> CreatedKey:
    return service_key_create(service_name="payment")


@pytest.fixture
def other_key(db: None) -> CreatedKey:
    return service_key_create(service_name="inventory")


_ids = itertools.count()
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


@pytest.fixture
def make_event() -> Callable[..., dict[str, Any]]:
    """A valid protocol event as a dict; keyword arguments override fields."""

    def make(type: str = "step.started", **fields: Any) -> dict[str, Any]:
        n = next(_ids)
        event: dict[str, Any] = {
            "id": f"evt-{n}",
            "saga_id": "saga-1",
            "type": type,
            "occurred_at": (T0 + timedelta(seconds=n % 1000)).isoformat().replace("+00:00", "Z"),
        }
        if type == "saga.started":
            event["saga_type"] = "order"
        if type.startswith(("step.", "compensation.")):
            event["step"] = "charge"
        if type.startswith("message."):
            event["message"] = {"name": "order.created", "id": f"msg-{n}", "version": 1}
        event.update(fields)
        return {k: v for k, v in event.items() if v is not None}

    return make


class Api:
    """Posts events with a key and reads results back, as a service would."""

    def __init__(self, client: Client, secret: str) -> None:
        self.client = client
        self.secret = secret

    def post(self, body: Any, *, raw: bytes | None = None, **headers: str) -> Any:
        data = raw if raw is not None else msgspec.json.encode(body)
        kwargs: dict[str, Any] = {"content_type": "application/json"}
        kwargs["HTTP_AUTHORIZATION"] = f"Bearer {self.secret}"
        for name, value in headers.items():
            kwargs[name] = value
        return self.client.post("/api/v1/events", data=data, **kwargs)

    def batch(self, events: list[dict[str, Any]]) -> Any:
        return self.post({"events": events})


@pytest.fixture
def api(service_key: CreatedKey) -> Api:
    return Api(Client(), service_key.secret)


@pytest.fixture
def user_client(db: None) -> Iterator[Client]:
    """A logged-in viewer (the least role that reads sagas)."""
    user = get_user_model().objects.create_user("olivia", password="pw-olivia-123")
    user.groups.add(role_group("viewer"))
    client = Client()
    client.force_login(user)
    yield client


def role_group(name: str) -> Any:
    """The role's group; re-created by the data migration's code if a flush removed it."""
    import importlib

    from django.apps import apps
    from django.contrib.auth.models import Group

    if not Group.objects.filter(name=name).exists():
        importlib.import_module("tracking.migrations.0004_roles").forwards(apps, None)
        importlib.import_module("tracking.migrations.0010_threshold_role").forwards(apps, None)
        importlib.import_module("tracking.migrations.0011_start_saga_role").forwards(apps, None)
    return Group.objects.get(name=name)


@pytest.fixture
def role_client(db: None) -> Callable[[str | None], Client]:
    """A logged-in client whose user has the given role (None: no role at all)."""

    def make(role: str | None) -> Client:
        user = get_user_model().objects.create_user(
            f"user-{role}-{next(_ids)}", password="pw-x-12345"
        )
        if role:
            user.groups.add(role_group(role))
        client = Client()
        client.force_login(user)
        return client

    return make


@contextmanager
def database_away() -> Iterator[None]:
    """Point the default connection at a port nothing listens on (PostgreSQL only)."""
    settings_dict = connection.settings_dict
    saved = copy.deepcopy(settings_dict)
    # The port first, then the pool: a pool another thread (re)creates in between
    # would otherwise still reach the server.
    settings_dict["PORT"] = "1"
    if "pool" in settings_dict.get("OPTIONS", {}):
        settings_dict["OPTIONS"]["pool"] = {**settings_dict["OPTIONS"]["pool"], "timeout": 1}
    connection.close()
    if hasattr(connection, "close_pool"):
        connection.close_pool()
    try:
        yield
    finally:
        connection.close()
        if hasattr(connection, "close_pool"):
            connection.close_pool()
        settings_dict.clear()
        settings_dict.update(saved)


@pytest.fixture
def test_sagas() -> Iterator[Any]:
    """The orchestrator's test saga types (tests/orchestrator/sagas.py), every action
    succeeding unless a test scripts its outcomes."""
    from tests.orchestrator import sagas

    sagas.CALLS.clear()
    sagas.SCRIPT.clear()
    sagas.PLAN.clear()
    yield sagas
    sagas.SCRIPT.clear()
    sagas.PLAN.clear()
