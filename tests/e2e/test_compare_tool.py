"""``ops.compare`` for real: a worktree of another revision (here HEAD itself), one pair of runs, each its own
``exchange dev`` (gunicorn api, dramatiq matchers and webhooks, sweeper, pgbouncer) on a fresh database, measured by
this checkout's ``exchange bench``; both sides report orders and the summary compares them. No timing assertion."""

from __future__ import annotations

import socket
import subprocess
import sys

import psycopg

from tests.e2e.conftest import REPO_ROOT, free_port
from tests.integration.redis_support import claimed_database


def _port_with_free_neighbours() -> int:
    """A free port whose +1000 and +2000..+2010 (pgbouncer, metrics) are free too."""
    for _ in range(50):
        port = free_port()
        if port + 2010 > 65535:
            continue
        neighbours = [port + 1000, *range(port + 2000, port + 2011)]
        with socket.socket() as probe:
            if all(probe.connect_ex(("127.0.0.1", n)) != 0 for n in neighbours):
                return port
    raise RuntimeError("no free port with free neighbours")


def test_compare_runs_both_sides_and_prints_the_medians_and_their_ratio(postgres_admin_url: str) -> None:
    port = _port_with_free_neighbours()
    with claimed_database() as redis_url:
        argv = [sys.executable, "-m", "ops.compare", "--base", "HEAD", "--pairs", "1", "--port", str(port)]
        argv += ["--postgres-url", postgres_admin_url, "--redis-url", redis_url]
        argv += ["--", "--closed-loop", "2", "--duration", "2", "--prefill", "1", "--receiver-port", "0"]
        proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"ops.compare failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("pair 1 base: orders/s ") for line in lines), proc.stdout
    assert any(line.startswith("pair 1 new: orders/s ") for line in lines), proc.stdout
    rates = next(line for line in lines if line.startswith("orders/s")).split()
    assert float(rates[1]) > 0, proc.stdout  # base
    assert float(rates[2]) > 0, proc.stdout  # this checkout
    assert float(rates[3]) > 0, proc.stdout  # the ratio of the medians
    cpu = next(line for line in lines if line.startswith("CPU ms/order")).split()
    assert float(cpu[2]) > 0, proc.stdout
    assert float(cpu[3]) > 0, proc.stdout
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert "exchange-compare-" not in worktrees  # removed after the run
    with psycopg.connect(postgres_admin_url) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (f"exchange_compare_{port}",))
        assert left.fetchone() == (0,)  # dropped after each run
    for stopped in (port, port + 1000):  # the api and pgbouncer of the last run are gone
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", stopped)) != 0
