"""The bench's webhook receiver process does not outlive a bench killed without stopping it (it runs in a session of
its own, where a signal to the bench's process group does not reach it)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

import psutil

from ops.bench.main import free_port
from ops.bench.receiver import receiver_main

CTX = multiprocessing.get_context("fork")


def _bench(pids: Any) -> None:
    """A bench that starts its receiver as ``exchange bench`` does, then waits to be killed."""
    stop, ready = CTX.Event(), CTX.Event()
    args = (free_port(), CTX.RawValue("d", 0.0), stop, ready, CTX.Queue(), CTX.RawValue("q", 0), 0)
    receiver = CTX.Process(target=receiver_main, args=args, daemon=True)
    receiver.start()
    ready.wait(10)
    pids.put(receiver.pid)
    time.sleep(60)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_receiver_ends_by_itself_when_the_bench_is_killed() -> None:
    pids = CTX.Queue()
    bench = CTX.Process(target=_bench, args=(pids,))
    bench.start()
    receiver_pid = pids.get(timeout=15)
    assert _running(receiver_pid)
    os.kill(bench.pid, signal.SIGKILL)
    bench.join(5)
    deadline = time.monotonic() + 10
    while _running(receiver_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _running(receiver_pid)
    if left:
        os.kill(receiver_pid, signal.SIGKILL)
    assert not left, "the receiver outlived the killed bench"
