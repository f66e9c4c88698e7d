"""Orchestrator throughput against the DBOS peer, measured in one run.

What it measures, on a fresh database (``sagaadmin_orchbench``, dropped and
recreated every run) of the local PostgreSQL server:

* sagas/s of the product: N sagas (default 2,000; ``--quick`` 300) of 4 local
  steps that do nothing (``bench/orch_sagas.py``), started with
  ``sagas_start`` 50 at a time and run to the end by
  ``orchestrator.worker.Worker`` (batches of 50) in separate processes
  (``bench/orch_worker.py``): with one worker, and with two (each starts half
  and both drain). Every transition is what production does: durable and
  atomic with the run and step rows, the saga's telemetry through tracking's
  ingest (event store, read model, rollups) and, where due, outbox messages;
  a worker commits the transitions of the runs it holds together (a group
  commit, docs/decisions/0016). Timed from the first worker's first start to
  the last worker's end. Afterwards every run must be ``completed`` (or
  ``compensated``) with every telemetry event stored, or the run fails.
* the same with each saga started alone (``saga_start``, a transaction per
  saga, as a service starting one saga per request does): shown, not used
  for the ratio.
* a failing variant: the 4th step fails for good, so 3 compensations run.
* the peer: ``/work/shared/peers/dbos_saga.py`` (DBOS durable workflows, a
  4-step saga, each step checkpointed), in its own virtualenv
  (``var/dbos-venv``, pip-installed when missing, never a project
  dependency), on its own database of the same server: sagas/s sequential
  and with 8 threads.

Prints each figure and the ratio of the product's best to the peer's best,
against the issue's bar (>= 3).

Usage: .venv/bin/python bench/orchestrator.py [--quick] [--sagas N] [--peer-sagas M]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DB = "sagaadmin_orchbench"
PEER_DB = "sagaadmin_orchbench_dbos"
PEER_VENV = ROOT / "var" / "dbos-venv"
PEER_SCRIPT = Path("/work/shared/peers/dbos_saga.py")
BAR = 3.0
EVENTS = {"bench-ok": 10, "bench-fail": 17}  # telemetry events per saga
ENDS = {"bench-ok": "completed", "bench-fail": "compensated"}


def database_reset(name: str) -> str:
    with psycopg.connect(f"{BASE}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{BASE}/{name}"


def product_env(url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "sagaadmin.settings.base",
        "LOG_LEVEL": "WARNING",
    }


def run_product(
    url: str, saga_type: str, sagas: int, workers: int, *, start_group: int = 50
) -> float:
    """sagas/s of ``workers`` processes running ``sagas`` sagas of ``saga_type``."""
    tag = f"{saga_type}-{workers}w-{uuid.uuid4().hex[:6]}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "orch_worker.py"),
                "--saga-type",
                saga_type,
                "--ids",
                f"{i}:{sagas}:{workers}",
                "--tag",
                tag,
                "--start-group",
                str(start_group),
            ],
            cwd=ROOT,
            env=product_env(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(workers)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed:\n{err.decode()[-3000:]}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    elapsed = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
    _check(url, tag, saga_type, sagas)
    return sagas / elapsed


def _check(url: str, tag: str, saga_type: str, sagas: int) -> None:
    with psycopg.connect(url) as conn:
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM orchestrator_sagarun WHERE saga_id LIKE %s "
                "GROUP BY status",
                [f"{tag}-%"],
            ).fetchall()
        )
        events = conn.execute(
            "SELECT count(*) FROM tracking_telemetryevent WHERE saga_id LIKE %s", [f"{tag}-%"]
        ).fetchone()[0]
    if statuses != {ENDS[saga_type]: sagas}:
        raise SystemExit(f"{tag}: runs ended {statuses}, expected {sagas} {ENDS[saga_type]}")
    if events != sagas * EVENTS[saga_type]:
        raise SystemExit(f"{tag}: {events} telemetry events, expected {sagas * EVENTS[saga_type]}")


def run_peer(sagas: int) -> tuple[float, float] | None:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print("installing the DBOS peer into var/dbos-venv ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [str(PEER_VENV / "bin" / "pip"), "install", "-q", "dbos", "psycopg[binary]"],
            check=True,
        )
    url = database_reset(PEER_DB).replace("postgresql://", "postgresql://", 1)
    done = subprocess.run(
        [str(python), str(PEER_SCRIPT), str(sagas)],
        env={**os.environ, "PG_URL": url},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    found = re.search(r"sequential=(\d+) threads8=(\d+)", done.stdout)
    if done.returncode != 0 or found is None:
        print(f"peer failed (ratio skipped):\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
        return None
    return float(found.group(1)), float(found.group(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 sagas, 200 peer sagas")
    parser.add_argument("--sagas", type=int, default=None)
    parser.add_argument("--peer-sagas", type=int, default=None)
    args = parser.parse_args()
    sagas = args.sagas or (300 if args.quick else 2000)
    peer_sagas = args.peer_sagas or (200 if args.quick else 1000)

    url = database_reset(DB)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=product_env(url), check=True
    )
    print(f"orchestrator: {sagas} sagas of 4 local steps per phase, PostgreSQL {DB}", flush=True)
    rows: list[tuple[str, float]] = []
    for saga_type, workers in (
        ("bench-ok", 1),
        ("bench-ok", 2),
        ("bench-fail", 1),
        ("bench-fail", 2),
    ):
        t = time.perf_counter()
        rate = run_product(url, saga_type, sagas, workers)
        kind = "success" if saga_type == "bench-ok" else "fail, 3 compensations"
        label = f"{kind}, {workers} worker{'s' if workers > 1 else ''}"
        rows.append((label, rate))
        print(f"  {label:<36} {rate:8.1f} sagas/s   ({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    alone = run_product(url, "bench-ok", sagas, 2, start_group=1)
    print(
        f"  {'success, 2 workers, started one by one':<36} {alone:8.1f} sagas/s   "
        f"({time.perf_counter() - t:.0f} s; not used for the ratio)",
        flush=True,
    )
    peer = run_peer(peer_sagas)
    best = max(rate for label, rate in rows if label.startswith("success"))
    print()
    print(f"{'product, success, best':<40} {best:8.1f} sagas/s")
    if peer is None:
        print("peer: not measured")
        return 0
    seq, par = peer
    print(f"{'DBOS, 4 steps, sequential':<40} {seq:8.1f} sagas/s   ({peer_sagas} sagas)")
    print(f"{'DBOS, 4 steps, 8 threads':<40} {par:8.1f} sagas/s")
    ratio = best / max(seq, par)
    verdict = "PASS" if ratio >= BAR else "FAIL"
    print(f"{'product best / DBOS best':<40} {ratio:8.2f}  (bar >= {BAR:g})  {verdict}")
    print(f"{'  started one by one / DBOS best':<40} {alone / max(seq, par):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
