"""What the benchmark scripts share: the bench database, manage.py, settings, CPU accounting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The run failed; its figures would mean nothing."""


def env_num(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def base_dsn() -> str:
    """The PostgreSQL server to measure (``BENCH_PG``), without a database name."""
    return os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432").rstrip("/")


def server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return row[0] if row else "?"


def database_recreate(base: str, name: str) -> tuple[str, str]:
    """Drop and create a bench database; return its DSN and the server version."""
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    return f"{base}/{name}", server_version(f"{base}/{name}")


def manage(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise BenchError(f"manage.py {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


@dataclasses.dataclass(frozen=True, slots=True)
class ProcCpu:
    """One process's CPU from /proc/<pid>/stat, in seconds."""

    name: str
    pgrp: int
    own: float  # utime + stime
    with_children: float  # plus cutime + cstime: exited children's (PostgreSQL backends
    # of closed connections end up in the postmaster's)


def process_cpu() -> dict[int, ProcCpu]:
    """Every process on the machine: pid -> its CPU so far."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        own = sum(int(v) for v in fields[11:13]) / tick
        children = sum(int(v) for v in fields[13:15]) / tick
        procs[int(entry.name)] = ProcCpu(name, int(fields[2]), own, own + children)
    return procs


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    # user nice system [idle iowait] irq softirq steal (guest is already in user)
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values[:3]) + sum(values[5:])) / os.sysconf("SC_CLK_TCK")


def tcp_peers(pids: list[int], port: int) -> dict[int, list[int]]:
    """pid -> the remote ports of its established TCP connections on local ``port``.

    Read from /proc (Linux): which worker process of a multi-process server
    holds which client connection. Empty lists where /proc is not readable.
    """
    remote_by_inode: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                remote_by_inode[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    peers: dict[int, list[int]] = {}
    for pid in pids:
        ports = peers.setdefault(pid, [])
        try:
            entries = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for entry in entries:
            try:
                link = os.readlink(entry.path)
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in remote_by_inode:
                ports.append(remote_by_inode[link[8:-1]])
    return peers
