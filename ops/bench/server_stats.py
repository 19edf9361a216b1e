"""``--server-stats``: what the measured window cost the exchange under test, per accepted order.

For an exchange of this project running on this machine: Redis commands executed (``INFO commandstats``, every
command, those run inside dramatiq's Lua scripts included; a Redis server shared with other work counts that work
too), PostgreSQL transactions and rows written in the exchange's database (``pg_stat_database``), and CPU seconds by
process kind read from ``/proc`` (Linux) of the exchange's own processes only: its database's PostgreSQL backends,
its Redis server, the processes serving its api port or connected to its database or its
pgbouncer, and their families (:mod:`ops.bench.scope`; another exchange, a test suite on the same PostgreSQL server
are left out, and the report counts the processes measured and left out by kind). The PostgreSQL server's shared
processes (checkpointer, walwriter, background writer, launchers, postmaster) are reported apart as
``postgres-shared`` (``shared_cpu_s``), outside the CPU per order: they also work for every other database.
Counts are deterministic where CPU seconds are not: on small shared machines the same run varies by tens of percent
in time, but sends the same number of commands for the same work.

Also by process kind, from the kernel's scheduler statistics (``/proc/<pid>/task/<tid>/schedstat``): the time the
processes' threads were ready to run but waited for a CPU (``run_delay``), and how many times they were put on one.
On a machine the load saturates, that wait is what latency is made of, and it says which process kind waits: the
part of a stage's latency no code change to that process removes, only less CPU used by everything else; every time
a thread is put on a CPU (a reply arrived, a lock was released, a message came) it may wait first, so the count is
the number of such hops, a count as stable as the Redis commands. Threads that ended during the window take their
figures with them (the exchange's threads live for the whole run); a kernel without scheduler statistics gives
none, and the report then has no such figures rather than zeros.

The snapshots bracket the run: from the senders' synchronised start to the end of the webhook grace (so the work
the run's orders caused is counted, deliveries included); the deltas are divided by the orders accepted in the run.
PostgreSQL's counters reach ``pg_stat_database`` up to a second late, a small error over a run of 20 s.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from ops.bench.scope import SHARED_KINDS, Found, Scope, exchange_scope

PROCESS_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("supervisor", ("exchange dev", "exchange.cli dev")),  # first: its command line names --pgbouncer-port
    ("postgres", ("postgres:", "/postgres ")),
    ("pgbouncer", ("pgbouncer",)),
    ("redis", ("redis-server",)),
    ("api", ("gunicorn", "uvicorn", "exchange.cli api")),
    ("matcher", ("workers.matching", "exchange.cli matcher")),
    ("webhooks", ("workers.webhooks", "exchange.cli webhooks")),
    ("sweeper", ("exchange.cli sweeper",)),
)
"""The exchange's process kinds by command-line substring, first match wins (a dramatiq worker's command line names
its module; ``exchange dev``'s names ``--pgbouncer-port``, and was counted as pgbouncer before it had a kind of its
own). The generator is not one: its senders have exited by the second snapshot."""


ProcessKey = tuple[int, int]
"""A process: its pid and its start time (clock ticks after boot), so a pid the kernel reuses is another process."""
PerProcess = dict[ProcessKey, tuple[str, float]]
"""A figure so far of each process of the exchange, with the process's kind. Kept by process, not summed by kind,
so that a delta is taken process by process (:func:`kind_deltas`): a process that ends between two snapshots takes
its figures with it rather than making its kind's sum go down (a sum by kind did: a PostgreSQL backend of other
work on the same server, or a gunicorn of another exchange, that exited during the run hid the kind's whole delta)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    redis_calls: dict[str, int]
    pg: dict[str, int]
    cpu_s: PerProcess
    """CPU seconds so far, by process."""
    wait_s: PerProcess
    """Run-queue wait so far, by process (empty when the kernel keeps no scheduler statistics)."""
    times_on_cpu: PerProcess
    """Times a thread was put on a CPU so far, by process (empty as ``wait_s``)."""
    scope: Scope | None = None
    """The exchange's processes among those (:mod:`ops.bench.scope`), with the kind each is reported under; None:
    every process by command line (no server was asked). The figures above stay those of every process of an
    exchange kind, so that a process first found to be the exchange's in the other snapshot has its figure here."""


def kind_of(cmdline: str) -> str | None:
    for kind, needles in PROCESS_KINDS:
        if any(needle in cmdline for needle in needles):
            return kind
    return None


TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after ``(comm)`` (state ppid pgrp ... utime stime ... starttime), or None
    when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far (0 when it is gone)."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / TICKS


def process_scheduling(pid: int) -> tuple[float, int] | None:
    """Seconds the threads of process ``pid`` have waited on a run queue so far, and how many times they were put on
    a CPU (None when the kernel keeps no scheduler statistics; zeros when the process is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0
    waited_ns = runs = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                _, waited, timeslices = fh.read().split()[:3]  # on-CPU ns, run-queue wait ns, times run
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return None  # the thread is there, its statistics are not: a kernel without CONFIG_SCHED_INFO
        except (OSError, ValueError):
            continue
        waited_ns += int(waited)
        runs += int(timeslices)
    return waited_ns / 1e9, runs


def exchange_processes() -> list[tuple[ProcessKey, str]]:
    """(process, kind) of every running process of the exchange (:data:`PROCESS_KINDS`)."""
    found: list[tuple[ProcessKey, str]] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                kind = kind_of(fh.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            continue
        fields = _stat(int(pid)) if kind is not None else None
        if kind is not None and fields is not None:
            found.append(((int(pid), int(fields[19])), kind))
    return found


def cpu_by_process(processes: list[tuple[ProcessKey, str]] | None = None) -> PerProcess:
    """CPU seconds used so far by every running process of the exchange (or of ``processes``, as
    :func:`exchange_processes` lists them)."""
    figures: PerProcess = {}
    for key, kind in exchange_processes() if processes is None else processes:
        fields = _stat(key[0])
        if fields is not None:  # gone since the scan: left out, not a 0 that kind_deltas would subtract from
            figures[key] = (kind, (int(fields[11]) + int(fields[12])) / TICKS)
    return figures


def scheduling_by_process(processes: list[tuple[ProcessKey, str]] | None = None) -> tuple[PerProcess, PerProcess]:
    """Run-queue wait so far (s) and times put on a CPU of every running process of the exchange (or of
    ``processes``); both empty when the kernel keeps no scheduler statistics."""
    waits: PerProcess = {}
    runs: PerProcess = {}
    for key, kind in exchange_processes() if processes is None else processes:
        stats = process_scheduling(key[0])
        if stats is None:
            return {}, {}
        if not os.path.exists(f"/proc/{key[0]}"):
            continue  # gone since the scan (its zeros would be subtracted from its kind)
        waits[key], runs[key] = (kind, stats[0]), (kind, stats[1])
    return waits, runs


def kind_deltas(before: PerProcess, after: PerProcess) -> dict[str, float]:
    """What each kind's processes used between two snapshots, largest first, kinds with none left out: per process
    that ``after`` saw, its figure less its figure in ``before`` (0 for a process that started in between); a process
    gone by ``after`` counts for nothing (its figures went with it)."""
    totals: dict[str, float] = {}
    for key, (kind, value) in after.items():
        totals[kind] = totals.get(kind, 0.0) + value - before.get(key, (kind, 0.0))[1]
    deltas = {k: round(v, 3) for k, v in totals.items()}
    return {k: v for k, v in sorted(deltas.items(), key=lambda kv: -kv[1]) if v > 0}


def _redis(redis_url: str, found: Found) -> dict[str, int]:
    """Commands executed so far by the Redis server of ``redis_url``; its pid into ``found``."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        stats = cast(dict[str, Any], client.info("commandstats"))  # the sync client: a dict, not an awaitable
        server = cast(dict[str, Any], client.info("server"))
    finally:
        client.close()
    found.redis_pid = int(server.get("process_id", 0)) or None
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def _pg(database_url: str, found: Found) -> dict[str, int]:
    """The counters of ``database_url``'s database; its backends and the server's shared processes into ``found``."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback, tup_inserted, tup_updated, tup_deleted"
            " FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        backends = conn.execute(
            "SELECT pid, datname IS NULL, client_port, inet_server_port() FROM pg_stat_activity"
            " WHERE (datname = current_database() OR datname IS NULL) AND pid <> pg_backend_pid()"
        ).fetchall()
    for pid, shared, client_port, server_port in backends:
        (found.pg_shared if shared else found.pg_backends).append(int(pid))
        if client_port is not None and client_port > 0:
            found.pg_client_ports.append(int(client_port))
        if server_port is not None:
            found.pg_port = int(server_port)
    if row is None:
        return {}
    return dict(zip(("transactions", "rows_inserted", "rows_updated", "rows_deleted"), map(int, row), strict=True))


def take(redis_url: str | None, database_url: str | None, base_url: str | None = None) -> Snapshot:
    """The figures so far of the exchange whose Redis database, PostgreSQL database and api are these URLs (each
    optional: what is not given is neither counted nor used to find the exchange's processes; none: every process
    by command line); its processes are told apart from other work on the machine by
    :func:`ops.bench.scope.exchange_scope`."""
    found = Found()
    if base_url:
        parts = urlsplit(base_url)
        found.api_port = parts.port or (443 if parts.scheme == "https" else 80)
    redis_calls = _redis(redis_url, found) if redis_url else {}
    pg = _pg(database_url, found) if database_url else {}
    processes = exchange_processes()  # one scan of /proc for every figure
    scope = exchange_scope(processes, found) if redis_url or database_url or base_url else None
    waits, runs = scheduling_by_process(processes)
    return Snapshot(time.monotonic(), redis_calls, pg, cpu_by_process(processes), waits, runs, scope)


def in_scope(figures: PerProcess, scope: Scope | None) -> PerProcess:
    """``figures`` of the processes of ``scope`` only, under the kinds ``scope`` gives them (all of them: None)."""
    if scope is None:
        return figures
    return {key: (scope[key], value) for key, (_, value) in figures.items() if key in scope}


def _counts(kinds: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(kinds).items()))


def per_order(before: Snapshot, after: Snapshot, accepted_orders: int) -> dict[str, Any]:
    """The deltas between two snapshots, in all and per accepted order: of the exchange's processes where both
    snapshots know them (a process the exchange's in either snapshot counts), of every process by kind otherwise."""
    orders = max(1, accepted_orders)
    calls = {k: v - before.redis_calls.get(k, 0) for k, v in after.redis_calls.items()}
    calls = {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0}
    pg = {k: v - before.pg.get(k, 0) for k, v in after.pg.items()}
    scope = None if before.scope is None or after.scope is None else {**before.scope, **after.scope}

    def deltas(b: PerProcess, a: PerProcess) -> tuple[dict[str, float], dict[str, float]]:
        both = kind_deltas(in_scope(b, scope), in_scope(a, scope))
        own = {k: v for k, v in both.items() if k not in SHARED_KINDS}
        return own, {k: v for k, v in both.items() if k in SHARED_KINDS}

    cpu, shared_cpu = deltas(before.cpu_s, after.cpu_s)
    # Both snapshots or neither: a figure from one side would count a whole lifetime as the run's.
    scheduler = bool(before.wait_s and after.wait_s)
    wait = deltas(before.wait_s, after.wait_s)[0] if scheduler else None
    runs = deltas(before.times_on_cpu, after.times_on_cpu)[0] if scheduler else None
    measured = in_scope(after.cpu_s, scope)
    return {
        "window_s": round(after.at - before.at, 3),
        "accepted_orders": accepted_orders,
        "redis_calls": calls,
        "redis_calls_per_order": round(sum(calls.values()) / orders, 2),
        "redis_scripts_per_order": round(calls.get("evalsha", 0) / orders, 2),
        "pg": pg,
        "pg_transactions_per_order": round(pg.get("transactions", 0) / orders, 2),
        "cpu_s": cpu,
        "cpu_ms_per_order": round(1000 * sum(cpu.values()) / orders, 2),
        "run_queue_wait_s": wait,
        "run_queue_wait_ms_per_order": None if wait is None else round(1000 * sum(wait.values()) / orders, 2),
        "times_on_cpu": runs,
        "times_on_cpu_per_order": None if runs is None else round(sum(runs.values()) / orders, 2),
        "shared_cpu_s": shared_cpu,
        "process_scope": "by name" if scope is None else "exchange",
        "processes": _counts(kind for kind, _ in measured.values()),
        "processes_left_out": _counts(kind for key, (kind, _) in after.cpu_s.items() if key not in measured),
    }
