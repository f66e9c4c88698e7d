# Saga Admin: the same server `make run` starts, as a non-root user.
# (Not buildable on this project's development machines: they have no Docker engine.)
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=sagaadmin.settings.base \
    SAGAADMIN_VAR_DIR=/var/lib/sagaadmin

RUN useradd --create-home --uid 10001 sagaadmin \
    && mkdir -p /var/lib/sagaadmin /tmp/sagaadmin-metrics \
    && chown sagaadmin /var/lib/sagaadmin /tmp/sagaadmin-metrics
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sagaadmin sagaadmin
COPY tracking tracking
COPY orchestrator orchestrator
COPY outbox outbox
COPY sagaclient sagaclient
COPY examples examples
COPY templates templates
COPY static static
COPY manage.py ./
RUN pip install --no-cache-dir .

USER sagaadmin
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# Several workers share their /metrics counters through this directory (docs/metrics.md).
ENV PROMETHEUS_MULTIPROC_DIR=/tmp/sagaadmin-metrics
CMD ["sh", "-c", "rm -f \"$PROMETHEUS_MULTIPROC_DIR\"/*.db; python manage.py migrate --noinput && exec uvicorn sagaadmin.asgi:application --host 0.0.0.0 --port 8000 --workers ${WEB_WORKERS:-2} --no-access-log"]
