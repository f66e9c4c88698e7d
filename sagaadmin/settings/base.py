"""Saga Admin settings: one module, every value from the environment.

Unset, the product runs *embedded*: SQLite under ``var/``, the in-memory
channel layer and the in-process transport. Each integration turns on when its
variable is set (``DATABASE_URL``, ``REDIS_URL``, ``BROKER_URL``). The table in
README.md lists every variable.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import environ

from sagaadmin.gc_tuning import threshold_parse

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(environ.Env().str("SAGAADMIN_VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()


def _secret_key() -> str:
    """The key from ``SECRET_KEY``, else one generated once and kept in var/."""
    if value := env.str("SECRET_KEY", default=""):
        return value
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "channels",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "tracking",
    "orchestrator",
    "outbox",
    "examples.order_fulfilment",  # the demo services' tables (manage.py demo)
]

MIDDLEWARE = [
    "sagaadmin.telemetry.TracingMiddleware",  # only with OTEL_* set (docs/opentelemetry.md)
    "sagaadmin.nul_guard.NulGuardMiddleware",  # a NUL in a request is a 400, not a DB error
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "sagaadmin.urls"
WSGI_APPLICATION = "sagaadmin.wsgi.application"
ASGI_APPLICATION = "sagaadmin.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database -------------------------------------------------------------
_SQLITE_URL = f"sqlite:///{VAR_DIR / 'sagaadmin.sqlite3'}"
DATABASES = {"default": env.db_url("DATABASE_URL", default=_SQLITE_URL)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["OPTIONS"] = {
        # One writer at a time: take the write lock at BEGIN so concurrent
        # ingest batches queue instead of failing with "database is locked".
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    # Under ASGI, Django's persistent connections are not reused across requests
    # (each request may run in another thread), so connections come from a
    # psycopg pool per process instead (CONN_MAX_AGE must then be 0).
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].setdefault(
        "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5)
    )
    # Django turns psycopg's statement preparation off (for transaction-mode
    # poolers). Its own queries bind client-side and are never prepared anyway;
    # what this prepares are the server-side statements of sagaadmin/db.py (the
    # bulk writes of tracking/bulk.py, outbox.publish()), run over and over with
    # the same text, whose planning costs PostgreSQL more than running them on
    # a handful of rows. Empty:
    # off (behind a transaction-mode PgBouncer, unless it is 1.21+ with
    # max_prepared_statements > 0).
    _prepare = env.str("DATABASE_PREPARE_THRESHOLD", default="5")
    DATABASES["default"]["OPTIONS"].setdefault(
        "prepare_threshold", int(_prepare) if _prepare.strip() else None
    )
    if env.bool("DATABASE_POOL", default=True):
        DATABASES["default"]["OPTIONS"]["pool"] = {
            "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=1),
            "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=10),
            "timeout": env.int("DATABASE_POOL_TIMEOUT", default=10),
        }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- channels -------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- auth -----------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Serve files straight from the finders: no collectstatic step before `make run`.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# --- REST API -------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "tracking.api.auth.ServiceKeyAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["tracking.api.auth.IsPerson"],
    "DEFAULT_RENDERER_CLASSES": ["tracking.api.renderers.SafeJSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "sagaadmin.problems.drf_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Saga Admin API",
    "DESCRIPTION": (
        "Report saga telemetry and read saga timelines. [Back to the dashboard](/). "
        "Every field and event type of the telemetry protocol: docs/protocol.md."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # the ingest and OTLP endpoints are not DRF views: tracking/api/schema.py adds them
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "tracking.api.schema.ingest_paths",
    ],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several models have a "status" with its own choices: name each enum.
    "ENUM_NAME_OVERRIDES": {
        "SagaStatusEnum": "tracking.models.SagaStatus",
        "StepStatusEnum": "tracking.models.StepStatus",
        "IncidentStatusEnum": "tracking.models.IncidentStatus",
        "ActionStatusEnum": "tracking.models.ActionStatus",
        "RunStatusEnum": "orchestrator.models.RunStatus",
        "StepRunStatusEnum": "orchestrator.models.StepRunStatus",
    },
}

# --- outbox and broker ----------------------------------------------------
# inprocess:// (embedded default: handlers in this process) or amqp://user:pass@host/vhost
BROKER_URL = env.str("BROKER_URL", default="inprocess://")
# manage.py demo: the failures it injects (examples/order_fulfilment/faults.py); empty: its default.
SAGAADMIN_DEMO_MIX = env.str("SAGAADMIN_DEMO_MIX", default="")
OUTBOX = {
    "BATCH_SIZE": env.int("OUTBOX_BATCH_SIZE", default=500),
    # after this many failed attempts a message is dead (kept for an operator)
    "MAX_ATTEMPTS": env.int("OUTBOX_MAX_ATTEMPTS", default=10),
    "BACKOFF_BASE_SECONDS": env.float("OUTBOX_BACKOFF_BASE_SECONDS", default=1.0),
    "BACKOFF_MAX_SECONDS": env.float("OUTBOX_BACKOFF_MAX_SECONDS", default=300.0),
    # how long the relay sleeps when idle without a NOTIFY (SQLite: always polls)
    "POLL_SECONDS": env.float("OUTBOX_POLL_SECONDS", default=1.0),
    # run_relay's claim loops side by side in one process (PostgreSQL, and a transport
    # that publishes concurrently: RabbitMQ): one batch's database work overlaps
    # another's broker round trip. 1 on SQLite.
    "RELAY_LOOPS": env.int("OUTBOX_RELAY_LOOPS", default=2),
    # run_worker deletes published messages older than this (dead ones stay)
    "RETENTION_DAYS": env.float("OUTBOX_RETENTION_DAYS", default=7.0),
}
# BROKER_URL=webhook://: topic -> [{"url": ..., "secret": ...}] (docs/outbox-transports.md)
OUTBOX_WEBHOOKS = env.json("OUTBOX_WEBHOOKS", default={})

# The saga orchestrator (docs/orchestrator.md).
ORCHESTRATOR = {
    # Where orchestrated sagas are reported: tracking's in-process ingest here.
    "REPORTER": env.str("ORCHESTRATOR_REPORTER", default="tracking.reporting.events_report"),
    # Modules whose import defines saga types (saga_define), imported at start-up.
    "SAGAS": env.list("ORCHESTRATOR_SAGAS", default=[]),
    # A worker's hold on a run; a crashed worker's runs resume after it.
    "LEASE_SECONDS": env.float("ORCHESTRATOR_LEASE_SECONDS", default=30.0),
    "BATCH": env.int("ORCHESTRATOR_BATCH", default=20),
    "POLL_SECONDS": env.float("ORCHESTRATOR_POLL_SECONDS", default=0.2),
    # Circuit breaker per remote service: open after N consecutive failures, for S seconds.
    "CIRCUIT_FAILURES": env.int("ORCHESTRATOR_CIRCUIT_FAILURES", default=5),
    "CIRCUIT_OPEN_SECONDS": env.float("ORCHESTRATOR_CIRCUIT_OPEN_SECONDS", default=30.0),
}

# --- Saga Admin -----------------------------------------------------------
SAGAADMIN = {
    # Ingest limits (413 past these; enforced while the body is read).
    "INGEST_MAX_BODY_BYTES": env.int("SAGAADMIN_INGEST_MAX_BODY_BYTES", default=1024 * 1024),
    "INGEST_MAX_EVENTS": env.int("SAGAADMIN_INGEST_MAX_EVENTS", default=1000),
    # Per-event payload cap (bytes of its JSON encoding) and nesting depth.
    "PAYLOAD_MAX_BYTES": env.int("SAGAADMIN_PAYLOAD_MAX_BYTES", default=64 * 1024),
    "PAYLOAD_MAX_DEPTH": env.int("SAGAADMIN_PAYLOAD_MAX_DEPTH", default=32),
    # Keys (case-insensitive) whose values are replaced by "[redacted]" in payloads.
    "PAYLOAD_REDACT_KEYS": env.list(
        "SAGAADMIN_PAYLOAD_REDACT_KEYS",
        default=["password", "secret", "token", "authorization", "card_number", "cvv", "iban"],
    ),
    # A reporter clock further than this from the server's receive time is flagged.
    "CLOCK_SKEW_SECONDS": env.float("SAGAADMIN_CLOCK_SKEW_SECONDS", default=30.0),
    "RETRY_AFTER_SECONDS": env.int("SAGAADMIN_RETRY_AFTER_SECONDS", default=5),
    # Links from a saga's trace ids to a tracing UI: "{trace_id}" is replaced, e.g.
    # http://jaeger:16686/trace/{trace_id} or a Grafana Tempo explore URL.
    "TRACE_URL": env.str("SAGAADMIN_TRACE_URL", default=""),
    # ASGI fast path back-pressure: past this many events waiting for the database,
    # POST /api/v1/events and the OTLP receiver answer 429 with Retry-After.
    "INGEST_MAX_BACKLOG_EVENTS": env.int("SAGAADMIN_INGEST_MAX_BACKLOG_EVENTS", default=50_000),
    # Group commit: how long a flush may wait for requests likely to come (docs/decisions/0008).
    "INGEST_LINGER_MS": env.float("SAGAADMIN_INGEST_LINGER_MS", default=2.0),
    # Ingest keeps the folds of this many recently reported sagas per process, so a
    # saga's next events are applied without re-reading its stored events (ADR 0015).
    "FOLD_CACHE_SAGAS": env.int("SAGAADMIN_FOLD_CACHE_SAGAS", default=5_000),
    # OTLP receiver: most bytes after decompression, most spans per request
    "OTLP_MAX_BYTES": env.int("SAGAADMIN_OTLP_MAX_BYTES", default=8 * 1024 * 1024),
    "OTLP_MAX_SPANS": env.int("SAGAADMIN_OTLP_MAX_SPANS", default=10_000),
    # ASGI: serve POST /api/v1/events from the group-committing fast path.
    "INGEST_FASTPATH": env.bool("SAGAADMIN_INGEST_FASTPATH", default=True),
    # How long the fast path trusts a looked-up service key (revocation delay).
    "KEY_CACHE_SECONDS": env.float("SAGAADMIN_KEY_CACHE_SECONDS", default=5.0),
    # Learned step durations (count, failures, duration histogram) kept at ingest.
    "STEP_STATS": env.bool("SAGAADMIN_STEP_STATS", default=True),
    # Detection defaults (docs/detection.md); a saga type's own thresholds win.
    "STUCK_AFTER_SECONDS": env.int("SAGAADMIN_STUCK_AFTER_SECONDS", default=900),
    "MAX_ATTEMPTS": env.int("SAGAADMIN_MAX_ATTEMPTS", default=5),
    "IN_DOUBT_AFTER_SECONDS": env.int("SAGAADMIN_IN_DOUBT_AFTER_SECONDS", default=300),
    # A step with no threshold is slow past this multiple of its learned p99 ...
    "SLOW_STEP_P99_MULTIPLE": env.float("SAGAADMIN_SLOW_STEP_P99_MULTIPLE", default=3.0),
    # ... once it has this many finished attempts in the last LEARN_DAYS days.
    "LEARN_MIN_SAMPLES": env.int("SAGAADMIN_LEARN_MIN_SAMPLES", default=100),
    "LEARN_DAYS": env.int("SAGAADMIN_LEARN_DAYS", default=7),
    "DETECT_INTERVAL_SECONDS": env.float("SAGAADMIN_DETECT_INTERVAL_SECONDS", default=10.0),
    # Alerts: at most ALERT_BURST messages per (saga type, kind) per window; the
    # rest fold into one summary message when the window ends.
    "ALERT_BURST": env.int("SAGAADMIN_ALERT_BURST", default=10),
    "ALERT_WINDOW_SECONDS": env.int("SAGAADMIN_ALERT_WINDOW_SECONDS", default=300),
    # An operator action's command with no answer from its service after this: timed_out.
    "ACTION_TIMEOUT_SECONDS": env.int("SAGAADMIN_ACTION_TIMEOUT_SECONDS", default=300),
    # Bulk actions: the most sagas one job may cover, and how fast it dispatches.
    "BULK_MAX_SAGAS": env.int("SAGAADMIN_BULK_MAX_SAGAS", default=10_000),
    "BULK_RATE_PER_SECOND": env.float("SAGAADMIN_BULK_RATE_PER_SECOND", default=20.0),
    # The two-person rule (docs/operations.md): these actions wait for a second
    # operator's approval (e.g. "terminate,skip_step,rerun_data"; "rerun_data" =
    # a rerun with edited data), and so do bulk jobs over more than N sagas (0: never).
    "TWO_PERSON_ACTIONS": env.list("SAGAADMIN_TWO_PERSON_ACTIONS", default=[]),
    "TWO_PERSON_BULK_ABOVE": env.int("SAGAADMIN_TWO_PERSON_BULK_ABOVE", default=0),
    # GET /metrics (docs/metrics.md): open to these networks (CIDRs) without a token,
    # and to anyone sending "Authorization: Bearer <METRICS_TOKEN>" when it is set.
    "METRICS_ALLOW": env.list("SAGAADMIN_METRICS_ALLOW", default=["127.0.0.1/32", "::1/128"]),
    "METRICS_TOKEN": env.str("SAGAADMIN_METRICS_TOKEN", default=""),
    # The garbage collector of the server and worker processes (ADR 0017): the
    # thresholds of gc.set_threshold ("" keeps Python's), and whether the objects
    # alive after start-up are frozen out of its passes.
    "GC_THRESHOLD": (
        threshold_parse(_gc_threshold)
        if (_gc_threshold := env.str("SAGAADMIN_GC_THRESHOLD", default="50000,20,10").strip())
        else None
    ),
    "GC_FREEZE": env.bool("SAGAADMIN_GC_FREEZE", default=True),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"trace": {"()": "sagaadmin.telemetry.TraceIdFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s%(trace)s %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["trace"]}
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
