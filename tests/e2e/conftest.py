"""Browser tests: a real uvicorn process on the test database, driven by Chromium.

The server runs the production settings (``sagaadmin.settings.base``) against
pytest-django's test database, so a test creates users, keys and sagas with the
ORM or the API and the browser sees them. A subprocess cannot share SQLite's
in-memory test database, and a file-backed one would need a change to the test
settings, so these tests need PostgreSQL (they skip elsewhere, and fail in CI).

Playwright drives Debian's Chromium (``/usr/bin/chromium``); no browser is
downloaded. Screenshots go to ``test-artifacts/screenshots/`` (gitignored).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection

from tests.conftest import need, role_group

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PASSWORD = "pw-e2e-correct-horse"


def _database_url(settings: dict[str, Any]) -> str:
    user = quote(settings.get("USER") or "", safe="")
    password = quote(settings.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or "5432"
    return f"postgres://{auth}{host}:{port}/{quote(settings['NAME'], safe='')}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    url: str
    log: Path

    def post_events(self, secret: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        """POST a batch as a service would; every event must be accepted."""
        request = urllib.request.Request(
            f"{self.url}/api/v1/events",
            data=json.dumps({"events": events}).encode(),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body: dict[str, Any] = json.loads(response.read())
        assert body["accepted"] == len(events), body
        return body


@pytest.fixture(scope="module")
def server(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """uvicorn serving the ASGI app on a free port, on the test database."""
    with django_db_blocker.unblock():
        vendor = connection.vendor
        settings_dict = dict(connection.settings_dict)
    need(
        vendor == "postgresql",
        "browser tests need PostgreSQL (the server process shares the test database): "
        f"run with DATABASE_URL=postgres://... (the suite is on {vendor})",
    )
    need(CHROMIUM.exists(), f"browser tests need Chromium at {CHROMIUM} (apt install chromium)")
    var_dir = tmp_path_factory.mktemp("e2e-var")
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
        "DATABASE_URL": _database_url(settings_dict),
        "SAGAADMIN_VAR_DIR": str(var_dir),
        "DEBUG": "false",
    }
    env.pop("REDIS_URL", None)  # one process: the in-memory channel layer is enough
    log = var_dir / "uvicorn.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(ROOT / ".venv/bin/uvicorn"),
                "sagaadmin.asgi:application",
                *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole below
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"uvicorn exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not answer /healthz in 30 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield Server(url=url, log=log)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def e2e(server: Server, transactional_db: None) -> Server:
    """The server, with data committed where the server process can see it."""
    return server


@pytest.fixture
def page_for(e2e: Server) -> Iterator[Callable[..., Any]]:
    """``page_for(viewport, **context_options)``: a page in a fresh browser context.

    Chromium starts on the first call. Create users and keys with the ORM
    *before* that: Playwright's sync API keeps an event loop running in this
    thread, and Django refuses ORM calls from a thread with a running loop.
    """
    from playwright.sync_api import sync_playwright

    started: list[Any] = []

    def make(viewport: dict[str, int] | None = None, **options: Any) -> Any:
        if not started:
            playwright = sync_playwright().start()
            started.append(playwright)
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            started.append(browser)
        context = started[1].new_context(viewport=viewport or DESKTOP, base_url=e2e.url, **options)
        context.set_default_timeout(5000)
        return context.new_page()

    yield make
    if started:
        started[1].close()
        started[0].stop()


def user_create(role: str | None, username: str = "vera") -> Any:
    """A user with a role group and a password the server's hashers accept."""
    user = get_user_model().objects.create(username=username)
    hasher = PBKDF2PasswordHasher()
    # The test settings hash with MD5, which the server (base settings) does not
    # know; a cheap PBKDF2 hash works on both sides.
    user.password = hasher.encode(PASSWORD, hasher.salt(), iterations=1000)
    user.save(update_fields=["password"])
    if role:
        user.groups.add(role_group(role))  # a flush by an earlier test may have removed it
    return user


def login(page: Any, username: str, next_path: str = "/") -> None:
    """Log in through the login form and land on ``next_path``."""
    page.goto(f"/login/?next={quote(next_path)}")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: urlsplit(url).path != "/login/" and url.endswith(next_path))


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(seconds: float) -> str:
    return iso(datetime.now(UTC) - timedelta(seconds=seconds))


def screenshot(page: Any, name: str) -> Path:
    """``<name>.png``, the full page, and ``<name>-viewport.png``, what the window shows."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-viewport.png"))
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def environ_set(name: str, value: str) -> Iterator[None]:
    """Body of a module fixture: ``name=value`` in the environment while it is active
    (so a server the module starts afterwards sees it), the old value back after."""
    saved = os.environ.get(name)
    os.environ[name] = value
    yield
    if saved is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = saved


@pytest.fixture(scope="module")
def server_defines_test_sagas() -> Iterator[None]:
    """The module's server imports the orchestrator's test sagas (tests/orchestrator/sagas.py).
    Request it with ``usefixtures`` so it is set before the module's server starts."""
    yield from environ_set("ORCHESTRATOR_SAGAS", "tests.orchestrator.sagas")
