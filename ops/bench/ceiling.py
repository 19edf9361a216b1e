"""The PostgreSQL ceiling: pgbench running a one-row INSERT per transaction, durable commits.

A scratch database (``exchange_bench_ceiling_<pid>``) with one table is created on the server of ``pg_url`` and
dropped afterwards; pgbench runs a custom script (``INSERT … VALUES (…)``, one statement = one transaction) with
``synchronous_commit=on`` forced through ``PGOPTIONS`` (and read back from a session of the same server with the same
options), so the figure is the durable single-row commit rate the same server sustains with the same number of
clients. The result names that server (``host:port``, never a password).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from exchange.db import migrate
from exchange.db.urls import with_database

SCRIPT = "INSERT INTO bench_orders (broker, symbol, price, quantity) VALUES (1, 'PETR4', 3850, 100);\n"
PGOPTIONS = "-c synchronous_commit=on"
TABLE = """CREATE TABLE bench_orders (
    id bigserial PRIMARY KEY,
    broker int NOT NULL,
    symbol text NOT NULL,
    price bigint NOT NULL,
    quantity bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)"""


def pgbench_binary() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return candidates[-1] if candidates else None


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def create_scratch_database(admin_url: str, name: str) -> str:
    """(Re)create the empty database ``name`` on ``admin_url``'s server; returns its URL."""
    drop_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(admin_url, name)


@contextmanager
def migrated_scratch_database(url: str, prefix: str, revision: str = "head") -> Iterator[str]:
    """A fresh database ``<prefix>_<pid>`` on ``url``'s server, migrated to ``revision``, dropped after; yields its
    URL."""
    name = f"{prefix}_{os.getpid()}"
    admin = with_database(url, "postgres")
    db_url = create_scratch_database(admin, name)
    try:
        migrate.upgrade(db_url, revision)
        yield db_url
    finally:
        drop_database(admin, name)


def server_of(url: str) -> str:
    """``host:port`` of a libpq URL's server (socket directory for a Unix socket), never its password."""
    params = conninfo_to_dict(url)
    host = str(params.get("host") or "localhost")
    return f"{host}:{params.get('port') or 5432}"


def run_pgbench(pg_url: str, clients: int, duration_s: int, *, threads: int | None = None) -> dict[str, Any]:
    """Run the ceiling; returns ``{pgbench_tps, clients, duration_s, synchronous_commit, …}`` or ``{error}``."""
    binary = pgbench_binary()
    out: dict[str, Any] = {
        "clients": clients,
        "duration_s": duration_s,
        "pgbench_tps": None,
        "server": server_of(pg_url),
    }
    if binary is None:
        out["error"] = "pgbench not found (install postgresql-client / postgresql-contrib)"
        return out
    name = f"exchange_bench_ceiling_{os.getpid()}"
    scratch = create_scratch_database(pg_url, name)
    try:
        with psycopg.connect(scratch, autocommit=True, connect_timeout=10) as conn:
            conn.execute(TABLE)
            fsync = conn.execute("SHOW fsync").fetchone()
        # What pgbench's sessions get: a session of the same server with the same PGOPTIONS, read back rather than
        # assumed (a server or a pooler in between may not honour the option).
        with psycopg.connect(scratch, autocommit=True, connect_timeout=10, options=PGOPTIONS) as conn:
            commit = conn.execute("SHOW synchronous_commit").fetchone()
        out["fsync"] = None if fsync is None else fsync[0]
        out["synchronous_commit"] = None if commit is None else commit[0]
        # synchronous_commit waits for a flush that fsync=off never makes
        out["durable"] = out["fsync"] == "on" and out["synchronous_commit"] not in ("off", "local", None)
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
            script.write(SCRIPT)
        try:
            argv = [binary, "-n", "-M", "prepared", "-f", script.name, "-c", str(clients)]
            argv += ["-j", str(threads or min(clients, max(1, os.cpu_count() or 1))), "-T", str(duration_s)]
            argv.append(scratch)
            env = {**os.environ, "PGOPTIONS": PGOPTIONS}
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + 60, check=False)
        finally:
            os.unlink(script.name)
        out["command"] = " ".join([*argv[:-1], "<scratch db>"])
        found = re.search(r"tps = ([0-9.]+) \((?:without|excluding)", proc.stdout) or re.search(
            r"tps = ([0-9.]+)", proc.stdout
        )
        if proc.returncode != 0 or not found:
            out["error"] = (proc.stderr or proc.stdout).strip()[-500:]
            return out
        out["pgbench_tps"] = float(found.group(1))
        latency = re.search(r"latency average = ([0-9.]+) ms", proc.stdout)
        out["pgbench_latency_avg_ms"] = float(latency.group(1)) if latency else None
        return out
    finally:
        drop_database(pg_url, name)
