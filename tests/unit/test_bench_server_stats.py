"""``exchange bench --server-stats``: the scheduler statistics read from ``/proc`` (run-queue wait, times put on a
CPU) and their arithmetic per accepted order."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ops.bench.server_stats import (
    PerProcess,
    Snapshot,
    cpu_by_process,
    kind_deltas,
    per_order,
    process_scheduling,
    scheduling_by_process,
)

BUSY_LOOP = "import time\nend = time.monotonic() + 0.6\nwhile time.monotonic() < end: pass\n"
BUSY_THREADS = """
import hashlib, threading, time
data = bytes(1 << 20)
def work():
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        hashlib.sha256(data).digest()
workers = [threading.Thread(target=work) for _ in range({threads})]
for w in workers: w.start()
for w in workers: w.join()
"""

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="Linux scheduler statistics")


KINDS = ("api", "matcher", "postgres", "sweeper")


def _one_process_per_kind(by_kind: dict[str, float]) -> PerProcess:
    return {(100 + KINDS.index(kind), 7): (kind, value) for kind, value in by_kind.items()}


def _snapshot(cpu: dict[str, float], wait: dict[str, float], runs: dict[str, float] | None = None) -> Snapshot:
    return Snapshot(
        at=0.0,
        redis_calls={},
        pg={},
        cpu_s=_one_process_per_kind(cpu),
        wait_s=_one_process_per_kind(wait),
        times_on_cpu=_one_process_per_kind(runs or {}),
    )


def _waited(pid: int) -> float:
    stats = process_scheduling(pid)
    assert stats is not None, "this kernel keeps scheduler statistics"
    return stats[0]


def test_processes_that_outnumber_the_cpus_have_waited_on_the_run_queue() -> None:
    busy = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range((os.cpu_count() or 1) + 2)
    ]  # more runnable processes than CPUs for 0.6 s: the scheduler must make some of them wait
    try:
        time.sleep(0.4)
        waits = [_waited(p.pid) for p in busy]
    finally:
        for p in busy:
            p.wait(timeout=30)
    assert sum(waits) > 0.01, waits


def test_the_wait_of_a_process_counts_every_thread_not_only_the_first() -> None:
    # Threads hashing large buffers run in parallel (hashlib lets go of the GIL), more of them than CPUs: they wait
    # on the run queue while the main thread only sleeps in join(). /proc/<pid>/schedstat is the main thread's.
    threads = (os.cpu_count() or 1) + 2
    child = subprocess.Popen([sys.executable, "-c", BUSY_THREADS.format(threads=threads)])
    try:
        time.sleep(0.4)
        total = process_scheduling(child.pid)
        with open(f"/proc/{child.pid}/schedstat") as fh:
            main_thread = [int(field) for field in fh.read().split()]
    finally:
        child.wait(timeout=30)
    assert total is not None
    assert total[0] > main_thread[1] / 1e9 + 0.01, (total, main_thread)
    assert total[1] > main_thread[2], (total, main_thread)  # the hashing threads were put on a CPU too


def test_a_process_that_is_gone_has_nothing_left_to_count() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    assert process_scheduling(proc.pid) == (0.0, 0)


def test_per_order_reports_the_wait_and_the_times_on_a_cpu_by_kind_and_per_accepted_order() -> None:
    before = _snapshot({"api": 1.0, "postgres": 2.0}, {"api": 0.5, "postgres": 1.0, "sweeper": 0.1}, {"api": 100})
    after = _snapshot({"api": 3.0, "postgres": 3.0}, {"api": 1.5, "postgres": 1.25, "sweeper": 0.1}, {"api": 600})

    got = per_order(before, after, accepted_orders=500)

    assert got["run_queue_wait_s"] == {"api": 1.0, "postgres": 0.25}  # largest first; none waited: left out
    assert list(got["run_queue_wait_s"]) == ["api", "postgres"]
    assert got["run_queue_wait_ms_per_order"] == 2.5
    assert got["times_on_cpu"] == {"api": 500}
    assert got["times_on_cpu_per_order"] == 1.0
    assert got["cpu_ms_per_order"] == 6.0


@pytest.mark.parametrize("side", ["before", "after"])
def test_per_order_has_no_wait_figures_when_a_snapshot_has_no_scheduler_statistics(side: str) -> None:
    with_wait, without = _snapshot({"api": 1.0}, {"api": 0.5}), _snapshot({"api": 2.0}, {})
    before, after = (without, with_wait) if side == "before" else (with_wait, without)

    got = per_order(before, after, accepted_orders=100)

    assert got["run_queue_wait_s"] is None
    assert got["run_queue_wait_ms_per_order"] is None
    assert got["times_on_cpu"] is None
    assert got["times_on_cpu_per_order"] is None


def test_a_process_that_ends_between_snapshots_does_not_cut_its_kinds_delta() -> None:
    # A PostgreSQL backend of other work that used 5 s and exited during the run: a sum by kind went down by it and
    # hid the 0.5 s the exchange's own backend used (seen as a postgres figure of 0 on a shared machine).
    before = {(10, 1): ("postgres", 2.0), (11, 1): ("postgres", 5.0)}
    after = {(10, 1): ("postgres", 2.5)}

    assert kind_deltas(before, after) == {"postgres": 0.5}


def test_a_process_that_started_between_snapshots_counts_from_zero_even_on_a_reused_pid() -> None:
    before = {(10, 1): ("api", 4.0)}
    after = {(10, 2): ("api", 0.25), (12, 3): ("matcher", 0.5)}  # pid 10 again, started later: another process

    assert kind_deltas(before, after) == {"matcher": 0.5, "api": 0.25}


def test_a_process_gone_between_the_scan_and_its_reading_is_left_out_of_the_snapshot() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    listed = [((proc.pid, 1), "postgres")]  # the scan saw it; it has exited since

    assert cpu_by_process(listed) == {}  # was {(pid, 1): ("postgres", 0.0)}: its kind's delta lost its whole figure
    assert scheduling_by_process(listed) == ({}, {})
