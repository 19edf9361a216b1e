"""``exchange bench --server-stats``: which processes of the machine are the exchange under test
(:mod:`ops.bench.scope`), found from its api port and its family, and what the report counts of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ops.bench.scope import Found, exchange_scope
from ops.bench.server_stats import Snapshot, exchange_processes, per_order

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="Linux /proc")

LISTENER = """
import os, socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
worker = os.fork()  # as gunicorn's: a worker that inherits the listening socket
if worker == 0:
    while True:
        time.sleep(1)
print(s.getsockname()[1], worker, flush=True)
busy = sys.argv[1] == "busy"
while True:
    if not busy:
        time.sleep(0.05)
"""
"""A process named like the api (``gunicorn`` in its command line) listening on a port, with a forked worker; it
prints the port and the worker's pid."""

SLEEPER = "import time\nprint(flush=True)\nwhile True: time.sleep(1)\n"

DEV = """
import subprocess, sys, time
api = subprocess.Popen([sys.executable, "-c", sys.argv[1], "idle", "gunicorn"], stdout=subprocess.PIPE)
sweeper = subprocess.Popen([sys.executable, "-c", sys.argv[2], "exchange.cli", "sweeper"], stdout=subprocess.DEVNULL)
print(api.stdout.readline().decode().strip(), api.pid, sweeper.pid, flush=True)
while True:
    time.sleep(1)
"""
"""A stand-in for ``exchange dev``: it starts an api and a sweeper that holds no connection at all; it prints the
api's port, its worker's pid, the api's pid and the sweeper's pid."""


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)  # each in a session of its own: its children go too
        proc.wait()


def _start(procs: list[subprocess.Popen[bytes]], *argv: str) -> list[int]:
    proc = subprocess.Popen([sys.executable, "-c", *argv], stdout=subprocess.PIPE, start_new_session=True)
    procs.append(proc)
    assert proc.stdout is not None
    return [proc.pid, *map(int, proc.stdout.readline().split())]


def _kinds_by_pid(found: Found) -> dict[int, str]:
    return {pid: kind for (pid, _), kind in exchange_scope(exchange_processes(), found).items()}


def test_the_api_is_the_process_serving_the_base_url_port_not_another_busy_gunicorn(
    started: list[subprocess.Popen[bytes]],
) -> None:
    _, port, worker = _start(started, LISTENER, "idle", "gunicorn")
    theirs, _, their_worker = _start(started, LISTENER, "busy", "gunicorn")

    scope = _kinds_by_pid(Found(api_port=port))

    assert scope[started[0].pid] == "api"
    assert scope[worker] == "api"  # the listener's family: its forked worker
    assert theirs not in scope
    assert their_worker not in scope


def test_everything_exchange_dev_started_is_the_exchange_a_sweeper_without_connections_included(
    started: list[subprocess.Popen[bytes]],
) -> None:
    dev, port, worker, api, sweeper = _start(started, DEV, LISTENER, SLEEPER, "exchange", "dev")
    outsider, *_ = _start(started, SLEEPER, "exchange.cli", "sweeper")  # another exchange's, started elsewhere

    scope = _kinds_by_pid(Found(api_port=port))

    assert scope[dev] == "supervisor"
    assert scope[api] == "api"
    assert scope[worker] == "api"
    assert scope[sweeper] == "sweeper"
    assert outsider not in scope


def test_no_process_is_the_exchange_when_nothing_identifies_it(started: list[subprocess.Popen[bytes]]) -> None:
    _start(started, LISTENER, "busy", "gunicorn")

    assert _kinds_by_pid(Found()) == {}


def _snapshot(cpu: dict[tuple[int, int], tuple[str, float]], scope: dict[tuple[int, int], str] | None) -> Snapshot:
    return Snapshot(at=0.0, redis_calls={}, pg={}, cpu_s=cpu, wait_s={}, times_on_cpu={}, scope=scope)


def test_a_process_found_to_be_the_exchanges_only_in_the_second_snapshot_counts_from_its_first_figure() -> None:
    # pgbouncer without a server connection at the first snapshot is found by the second one: its delta is what it
    # used in between, not its whole lifetime.
    bouncer, other = (10, 1), (11, 1)
    before = _snapshot({bouncer: ("pgbouncer", 5.0), other: ("pgbouncer", 7.0)}, {})
    after = _snapshot({bouncer: ("pgbouncer", 5.5), other: ("pgbouncer", 9.0)}, {bouncer: "pgbouncer"})

    got = per_order(before, after, accepted_orders=10)

    assert got["cpu_s"] == {"pgbouncer": 0.5}
    assert got["processes"] == {"pgbouncer": 1}
    assert got["processes_left_out"] == {"pgbouncer": 1}
    assert got["process_scope"] == "exchange"


def test_postgres_shared_processes_are_reported_apart_from_the_cpu_per_order() -> None:
    backend, walwriter = (20, 1), (21, 1)
    scope = {backend: "postgres", walwriter: "postgres-shared"}
    before = _snapshot({backend: ("postgres", 1.0), walwriter: ("postgres", 1.0)}, scope)
    after = _snapshot({backend: ("postgres", 2.0), walwriter: ("postgres", 4.0)}, scope)

    got = per_order(before, after, accepted_orders=1000)

    assert got["cpu_s"] == {"postgres": 1.0}
    assert got["shared_cpu_s"] == {"postgres-shared": 3.0}
    assert got["cpu_ms_per_order"] == 1.0
