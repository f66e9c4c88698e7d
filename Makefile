# Saga Admin: `make run` starts the dashboard, `make test` runs every check.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
export DJANGO_SETTINGS_MODULE ?= sagaadmin.settings.base

# The first interpreter that is Python 3.12 or newer: on PATH, then pyenv's.
PYTHON ?= $(shell for c in python3.13 python3.12 python3 \
	$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -Vr) \
	/usr/bin/python3.13 /usr/bin/python3.12; do \
	command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { command -v $$c; break; }; done)

.PHONY: run test lint typecheck venv migrate bench-ingest bench-otlp bench-queries bench-relay bench-detect bench-orchestrator clean help

help:
	@echo "make run    - set up .venv, migrate, start the dashboard on http://$(HOST):$(PORT)"
	@echo "make run DEMO=0 - the same without the demo services and their orders"
	@echo "make test   - ruff, migrations check, mypy and the whole pytest suite"
	@echo "make bench-ingest - ingest throughput against raw PostgreSQL"
	@echo "make bench-otlp - OTLP/HTTP receiver spans/s against /api/v1/events events/s"
	@echo "make bench-queries - dashboard/API query times on 1M sagas against raw SQL"
	@echo "make bench-relay - outbox relay to RabbitMQ against raw broker/database and a peer"
	@echo "make bench-detect - detector pass on 1M sagas; ingest with step stats on/off"
	@echo "make bench-orchestrator - orchestrated sagas/s against the DBOS peer"

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "Python 3.12+ not found: install it or set PYTHON=/path/to/python3.12"; exit 1; fi
	@echo "Using $(PYTHON) ($$($(PYTHON) --version))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

migrate: venv
	$(PY) manage.py migrate --noinput

# The web server, the background worker (relay, detector, orchestrator) and, unless
# DEMO=0, the example order-fulfilment services placing orders (manage.py demo).
# With the in-process transport (the embedded default) the services run inside the
# worker's process; with BROKER_URL set, each is a process of its own. Ctrl-C stops all.
DEMO ?= 1
DEMO_ARGS ?=
run: migrate
	@$(PY) manage.py ensure_admin
	@echo "Dashboard: http://$(HOST):$(PORT)/   API docs: http://$(HOST):$(PORT)/api/v1/docs"
	@pids=(); start() { "$$@" & pids+=($$!); }; \
	trap 'kill $${pids[@]} 2>/dev/null; wait $${pids[@]} 2>/dev/null' EXIT INT TERM; \
	url=http://$(HOST):$(PORT); \
	if [ "$(DEMO)" = 0 ]; then start $(PY) manage.py run_worker; \
	elif [[ "$${BROKER_URL:-inprocess://}" == inprocess:* ]]; then \
	  echo "Demo: order-fulfilment services and orders (make run DEMO=0 for none)"; \
	  start $(PY) manage.py demo --url $$url $(DEMO_ARGS); \
	else \
	  echo "Demo: order-fulfilment services on $${BROKER_URL##*@} (make run DEMO=0 for none)"; \
	  start $(PY) manage.py run_worker; \
	  for s in order payment inventory shipping; do \
	    start $(PY) manage.py demo --services $$s --no-traffic --worker no --url $$url; done; \
	  start $(PY) manage.py demo --services none --worker no --url $$url $(DEMO_ARGS); \
	fi; \
	$(VENV)/bin/uvicorn sagaadmin.asgi:application --host $(HOST) --port $(PORT) --no-access-log

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy sagaadmin tracking orchestrator outbox sagaclient examples

test: lint typecheck
	DJANGO_SETTINGS_MODULE=sagaadmin.settings.test $(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/pytest

bench-ingest: venv
	$(PY) bench/ingest.py

bench-otlp: venv
	$(PY) bench/otlp.py

bench-queries: venv
	$(PY) bench/queries.py

bench-relay: venv
	$(PY) bench/relay.py

bench-detect: venv
	$(PY) bench/detect.py

bench-orchestrator: venv
	$(PY) bench/orchestrator.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
