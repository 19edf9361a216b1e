"""Compare this checkout's exchange with another revision's under the same load, alternating runs.

    uv run python -m ops.compare --base REV [--pairs N] [--port P] -- <exchange bench arguments>

On the project's 2-core machines one run of ``exchange bench`` varies by 10-25 % from the next with the same code,
so a single run of each side says little. This tool checks ``REV`` out in a git worktree (``uv sync --frozen``
there), then runs ``N`` pairs, alternating which side goes first: for each run a fresh database and a flushed Redis
database, ``exchange dev`` of that side on ``--port`` (its own venv, no ``uv run`` wrapper), ``exchange bench`` of
THIS checkout against it with ``--server-stats`` (the same generator for both sides), then ``exchange dev``
stopped and the database dropped. It prints every run and, per side, the median of accepted orders/s, POST p50/p99,
order->fill p50, fill->webhook p50, server CPU per order by process kind (and, where the kernel keeps scheduler
statistics, the time each kind waited for a CPU and how many times the processes were put on one, per order),
PostgreSQL transactions and Redis commands per order and the new-order stages' p50, with the ratio of the medians
(this side / base) and in how many pairs this side's figure was lower and higher than the base's.

PostgreSQL and Redis are the local ones (``--postgres-url``, ``--redis-url``); nothing else may serve on ``--port``,
``--port`` + 1000 (pgbouncer) or ``--port`` + 2001 to + 2010 (the workers' metrics), nor use the Redis database,
while it runs (it checks both before every run). SIGTERM, SIGHUP and Ctrl-C stop the running side and remove the
worktree and the database.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import psycopg
import redis

from exchange.db.urls import with_database
from ops.bench.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "compare-admin-key"
METRICS_PORTS = range(2001, 2011)
"""Offsets from ``--port`` of the metrics ports ``exchange dev`` gives its workers (matcher-0 = +2001, ...)."""


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run every ``finally``: stop dev, drop the database, remove the worktree


def _worktree(rev: str, path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True)
    subprocess.run(["uv", "sync", "--frozen"], cwd=path, check=True)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exchange dev exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"exchange dev not ready on port {port} within {timeout_s} s")


def _stop(process: subprocess.Popen[bytes], state_dir: Path) -> None:
    """SIGTERM to dev's process group (dev stops its children and pgbouncer), SIGKILL after 60 s; then
    ``pgbouncer.sh stop`` (a no-op when dev did): revisions before ``a6c1175`` ran pgbouncer as a daemon outside the
    group, and a killed dev leaves the stand-in directory of pgbouncer's files behind."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
    subprocess.run(["bash", str(REPO / "ops" / "scripts" / "pgbouncer.sh"), "stop", str(state_dir / "pgbouncer")])


def flush_unshared_redis(redis_url: str) -> None:
    """Empty the Redis database of ``redis_url`` for a run, after checking that no other program is connected to it.
    A leftover ``exchange dev`` (or any dramatiq worker) on the same database would take the run's messages and
    measure nothing of the side under test (seen: a forgotten exchange's matcher took the run's wake-ups, every
    new order waited out the api's 250 ms and both sides reported 7 orders/s at concurrency 1)."""
    client = redis.Redis.from_url(redis_url)
    try:
        own = client.client_id()
        db = int(client.connection_pool.connection_kwargs.get("db", 0))
        clients = cast(list[dict[str, Any]], client.client_list())  # the sync client: a list, not an awaitable
        others = [c for c in clients if int(c.get("db", -1)) == db and int(c["id"]) != own]
        if others:
            seen = ", ".join(sorted({f"{c.get('addr')} ({c.get('cmd')})" for c in others}))
            raise RuntimeError(
                f"{len(others)} other client(s) connected to Redis database {db} ({seen}): a leftover exchange "
                "would take this run's messages; stop it or pass another --redis-url"
            )
        client.flushdb()
    finally:
        client.close()


def _run_once(side: Path, args: argparse.Namespace, bench_args: list[str], work: Path, label: str) -> dict[str, Any]:
    database = f"exchange_compare_{args.port}"
    database_url = with_database(args.postgres_url, database)
    busy = [p for p in (args.port, args.port + 1000, *(args.port + n for n in METRICS_PORTS)) if _port_in_use(p)]
    if busy:
        raise RuntimeError(f"something already serves 127.0.0.1 ports {busy}: stop it or pass another --port")
    with psycopg.connect(args.postgres_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{database}"')
    flush_unshared_redis(args.redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "dramatiq_", "VIRTUAL_ENV"))}
    env.pop("PYTHONPATH", None)
    (work / "empty.env").write_text("")  # neither side reads a .env of its checkout: both get exactly these
    env.update(
        EXCHANGE_ADMIN_API_KEY=ADMIN_KEY,
        EXCHANGE_DATABASE_URL=database_url,
        EXCHANGE_REDIS_URL=args.redis_url,
        EXCHANGE_ENV_FILE=str(work / "empty.env"),
    )
    state_dir = work / f"state-{label}"
    log = (work / f"dev-{label}.log").open("wb")
    dev = subprocess.Popen(
        [
            *(str(side / ".venv" / "bin" / "exchange"), "dev", "--port", str(args.port)),
            *("--pgbouncer-port", str(args.port + 1000), "--metrics-port", str(args.port + 2000)),
            *("--state-dir", str(state_dir)),
        ],
        cwd=side,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    report_path = work / f"{label}.json"
    try:
        _wait_ready(args.port, dev)
        subprocess.run(
            [
                *(sys.executable, "-m", "exchange.cli", "bench", "--base-url", f"http://127.0.0.1:{args.port}"),
                *("--admin-key", ADMIN_KEY, "--server-stats", "--redis-url", args.redis_url),
                *("--database-url", database_url, "--json", str(report_path), *bench_args),
            ],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    finally:
        _stop(dev, state_dir)
        log.close()
        with psycopg.connect(args.postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The compared figures of one ``exchange bench --json`` report."""
    post = report.get("endpoints", {}).get("POST /orders", {})
    fill = report.get("order_to_fill", {})
    webhook = report.get("fill_to_webhook", {})
    stats = report.get("server_stats", {})
    orders = max(1, int(stats.get("accepted_orders", 0)))
    out = {
        "orders/s": float(report.get("accepted_orders_per_s") or 0.0),
        "POST p50 ms": float(post.get("p50_ms") or 0.0),
        "POST p99 ms": float(post.get("p99_ms") or 0.0),
        "order->fill p50 ms": float(fill.get("p50_ms") or 0.0),
        "fill->webhook p50 ms": float(webhook.get("p50_ms") or 0.0),
        "CPU ms/order": float(stats.get("cpu_ms_per_order") or 0.0),
    }
    for kind, seconds in stats.get("cpu_s", {}).items():
        out[f"  {kind} ms/order"] = round(1000 * float(seconds) / orders, 3)
    for kind, seconds in stats.get("shared_cpu_s", {}).items():  # not in CPU ms/order: shared with other databases
        out[f"  ({kind} ms/order)"] = round(1000 * float(seconds) / orders, 3)
    if stats.get("run_queue_wait_s") is not None:  # the kernel keeps scheduler statistics
        out["CPU wait ms/order"] = float(stats["run_queue_wait_ms_per_order"])
        for kind, seconds in stats["run_queue_wait_s"].items():
            out[f"  {kind} wait ms/order"] = round(1000 * float(seconds) / orders, 3)
        out["put on a CPU /order"] = float(stats["times_on_cpu_per_order"])
    # Counts: the stable figures of a noisy machine (the same work sends the same statements and commands).
    if "pg_transactions_per_order" in stats:
        out["PG transactions/order"] = float(stats["pg_transactions_per_order"])
    if "redis_calls_per_order" in stats:
        out["Redis commands/order"] = float(stats["redis_calls_per_order"])
    stages = report.get("order_stages", {})
    for name in STAGES:
        p50 = stages.get(name, {}).get("p50_ms")
        if p50 is not None:
            out[f"stage {name} p50 ms"] = float(p50)
    machine = report.get("machine", {})
    if "wakeup_round_trip_us" in machine:  # the machine's phase at each run's start: a pair split by it says little
        out["machine wake-up us"] = float(machine["wakeup_round_trip_us"])
        out["machine chunk ms"] = float(machine["chunk_ms"])
    return out


def summary(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """One line per figure: the median of each side, the ratio of the medians (new / base), and in how many pairs
    the new side's figure was lower and higher than the base's of the same pair (the rest: equal). On a machine
    where one run differs from the next by 10-25 %, a ratio of medians with the pairs split 3:2 says little; one
    with every pair on the same side says more."""
    names = list(dict.fromkeys(name for side in runs.values() for run in side for name in run))
    pairs = list(zip(runs["base"], runs["new"], strict=True))
    header = f"{'median of ' + str(len(runs['base'])) + ' runs':<24}{'base':>10}{'new':>10}{'new/base':>10}"
    lines = [f"{header}{'pairs lower:higher':>20}"]
    for name in names:
        base = statistics.median(run.get(name, 0.0) for run in runs["base"])
        new = statistics.median(run.get(name, 0.0) for run in runs["new"])
        ratio = f"{new / base:.3f}" if base else "-"
        lower = sum(n.get(name, 0.0) < b.get(name, 0.0) for b, n in pairs)
        higher = sum(n.get(name, 0.0) > b.get(name, 0.0) for b, n in pairs)
        lines.append(f"{name:<24}{base:>10.3f}{new:>10.3f}{ratio:>10}{f'{lower}:{higher}':>20}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m ops.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. main~3, a tag, a sha)")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each side, alternating (default 3)")
    parser.add_argument("--port", type=int, default=8300, help="api port of both sides (default 8300)")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="flushed before every run")
    args = parser.parse_args(ours)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    with tempfile.TemporaryDirectory(prefix="exchange-compare-") as tmp:
        work = Path(tmp)
        base = work / "base"
        sides = {"base": base, "new": REPO}
        runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
        try:
            _worktree(args.base, base)
            for pair in range(args.pairs):
                order = ["base", "new"] if pair % 2 == 0 else ["new", "base"]
                for name in order:
                    result = figures(_run_once(sides[name], args, bench_args, work, f"{name}-{pair}"))
                    runs[name].append(result)
                    shown = ", ".join(f"{k.strip()} {v:g}" for k, v in list(result.items())[:5])
                    print(f"pair {pair + 1} {name}: {shown}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
        print("\n".join(summary(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
