"""Smoke test of ``exchange bench`` against the real multi-process exchange of the e2e harness.

A short open-loop run at 5 % of B3 (and the pgbench ceiling when pgbench is installed): the JSON report has the
documented keys, orders were accepted, the generator's own schedule lag and the server's cost per order
(``--server-stats``) are reported, and the traffic left the database consistent (DESIGN.md §6). No timing
assertions: CI machines are slow and shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ops.bench.ceiling import pgbench_binary
from ops.bench.server_stats import PROCESS_KINDS
from tests.e2e.conftest import REPO_ROOT, Harness

ENDPOINTS = {
    "POST /orders",
    "POST /orders/{id}/cancel",
    "GET /orders/{id}",
    "GET /stocks/{symbol}/price",
    "GET /stocks/{symbol}/book",
    "GET /balance",
}


def test_bench_open_loop_smoke(e2e_harness: Harness, postgres_admin_url: str, tmp_path: Path) -> None:
    h = e2e_harness
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "exchange.cli", "bench", "--base-url", h.base_url, "--admin-key", h.admin_key]
    argv += ["--scale", "5", "--duration", "3", "--prefill", "1", "--webhook-grace", "2", "--json", str(out)]
    argv += ["--server-stats", "--redis-url", h.redis_url, "--database-url", h.database_url]
    ceiling = pgbench_binary() is not None
    if ceiling:
        argv += ["--ceiling", "--ceiling-duration", "1", "--pg-url", postgres_admin_url]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"exchange bench failed:\n{proc.stdout}\n{proc.stderr}"

    report = json.loads(out.read_text())
    assert report["mode"] == "open_loop"
    assert report["accepted_orders_per_s"] > 0, proc.stdout
    assert isinstance(report["errors"], dict)
    assert report["errors"]["total"] == 0, report["errors"]
    assert set(report["scheduled"]) >= ENDPOINTS
    orders = report["endpoints"]["POST /orders"]
    assert orders["count"] > 0
    for endpoint, stats in report["endpoints"].items():
        if stats["count"]:
            assert {"p50_ms", "p95_ms", "p99_ms", "max_ms"} <= set(stats), endpoint
            assert 0 <= stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"], (endpoint, stats)
    lag = report["schedule_lag"]
    assert lag["count"] > 0
    assert lag["p99_ms"] is not None
    assert isinstance(report["valid"], bool)
    assert "order_to_fill" in report
    assert "fill_to_webhook" in report
    stages = report["order_stages"]  # --server-stats: every accepted new order is in the database, processed
    assert stages["orders"] + stages["answered_before_match"] == orders["count"], stages
    assert stages["not_processed"] == 0, stages
    if ceiling:
        assert report["ceiling"]["pgbench_tps"], report["ceiling"]
        assert report["ceiling"]["ratio"] > 0
    assert "accepted orders/s" in proc.stdout
    machine = report["machine"]
    assert machine["cpus"] >= 1
    assert machine["wakeup_round_trip_us"] > 0
    assert machine["chunk_ms"] > 0
    assert "machine: " in proc.stdout
    generator = report["generator_cpu_s"]  # the generator's own share of the machine: its senders sent, it received
    assert generator["senders"] > 0, generator
    assert generator["receiver"] > 0, generator
    assert "generator CPU: " in proc.stdout
    stats = report["server_stats"]
    assert stats["accepted_orders"] > 0
    assert stats["redis_calls"].get("evalsha", 0) > 0, stats  # dramatiq's scripts: wake-ups were consumed
    assert stats["redis_calls_per_order"] > 0
    assert stats["pg"]["rows_inserted"] >= stats["accepted_orders"], stats  # at least each order's row
    assert stats["pg_transactions_per_order"] > 0
    assert stats["cpu_s"].get("postgres", 0) > 0, stats
    # The harness's processes are found by their connections and port, not by a supervisor (it has none; its
    # pgbouncer is a daemon): every kind of the exchange is measured.
    assert stats["process_scope"] == "exchange", stats
    assert {"api", "matcher", "webhooks", "sweeper", "pgbouncer", "postgres", "redis"} <= set(stats["processes"]), stats
    assert "server processes measured (the exchange's): " in proc.stdout
    assert stats["cpu_ms_per_order"] > 0
    if os.path.exists("/proc/self/schedstat"):  # the kernel keeps scheduler statistics
        assert isinstance(stats["run_queue_wait_s"], dict), stats
        assert stats["run_queue_wait_ms_per_order"] >= 0
        assert set(stats["run_queue_wait_s"]) <= {kind for kind, _ in PROCESS_KINDS}, stats
        assert stats["times_on_cpu"].get("api", 0) > 0, stats
        assert stats["times_on_cpu"].get("postgres", 0) > 0, stats
        assert "waiting for a CPU (run queue)" in proc.stdout

    h.check_invariants()


def test_bench_api_reports_cpu_per_request_for_each_endpoint(e2e_harness: Harness) -> None:
    h = e2e_harness
    argv = [sys.executable, "-m", "ops.bench_api", "--base-url", h.base_url, "--admin-key", h.admin_key]
    argv += ["--requests", "64", "--concurrency", "4"]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"ops.bench_api failed:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    for path in ("/balance", "/orders/not-an-id", "/stocks/BENCH/book"):
        measured = [line for line in lines if f"GET {path} " in line]
        assert len(measured) == 2, proc.stdout  # two rounds
        assert all("µs/request" in line and "requests/s" in line for line in measured), proc.stdout


def test_bench_api_measures_only_the_endpoints_it_is_given(e2e_harness: Harness) -> None:
    h = e2e_harness
    argv = [sys.executable, "-m", "ops.bench_api", "--base-url", h.base_url, "--admin-key", h.admin_key]
    argv += ["--requests", "16", "--concurrency", "2", "--endpoint", "/stocks/NONE/price:404"]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"ops.bench_api failed:\n{proc.stdout}\n{proc.stderr}"
    measured = [line for line in proc.stdout.splitlines() if "µs/request" in line]
    assert len(measured) == 2, proc.stdout
    assert all("GET /stocks/NONE/price " in line for line in measured), proc.stdout
