"""How steady this machine's CPU is, with nothing of the exchange running: is it fit to compare benchmark runs?

    uv run python -m ops.cpu_steadiness [--seconds 60] [--chunk-additions 300000] [--slow-factor 1.3]

Times one fixed chunk of interpreter work (``--chunk-additions`` integer additions) again and again for
``--seconds``, with a 50 ms pause between chunks (so it measures the core's speed, not a queue it builds itself),
and prints the median chunk time, p90 / median, and for every second of the run the share of its chunks slower than
``--slow-factor`` x the median. On a steady machine that share is 0 almost everywhere. The project's shared 2-core
machines have shown spells of several seconds in which most chunks ran 1.3-1.6x slower while the machine was idle
(no steal time reported): a server at 80-90 % of its capacity (``exchange bench --scale 100``) falls behind in such
a spell and catches up after it, a likely part of the spread between runs of the same code (ops/MEASURED.md,
"Overload spells").

It also times a cross-process wake-up: one byte sent to a child process and back over a socket pair, ``--wakeups``
times (the median round trip). Every stage of the exchange's pipeline is such a wake-up (a request reaching the api,
a statement reaching PostgreSQL through pgbouncer, a wake-up reaching the matcher), and a machine can be fast at
the interpreter's work and slow at this (ops/MEASURED.md, "a machine of costly wake-ups"). Numbers only: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

PAUSE_S = 0.05


@dataclass(frozen=True, slots=True)
class Steadiness:
    median_s: float
    p90_over_median: float
    slow_share_by_second: list[float]
    """For each whole second since the start (in order, seconds without a chunk skipped), the fraction of its
    chunks slower than the slow factor x the median."""


def chunk(additions: int) -> float:
    """Seconds one chunk of ``additions`` integer additions takes."""
    started = time.perf_counter()
    total = 0
    for i in range(additions):
        total += i
    return time.perf_counter() - started


def steadiness(samples: list[tuple[float, float]], slow_factor: float) -> Steadiness:
    """Summarize ``(seconds since the start, chunk time)`` samples (at least one)."""
    times = sorted(duration for _, duration in samples)
    median = statistics.median(times)
    p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
    by_second: dict[int, list[bool]] = defaultdict(list)
    for at, duration in samples:
        by_second[int(at)].append(duration > slow_factor * median)
    shares = [sum(flags) / len(flags) for _, flags in sorted(by_second.items())]
    return Steadiness(median, p90 / median, shares)


def measure(seconds: float, additions: int) -> list[tuple[float, float]]:
    started = time.monotonic()
    samples: list[tuple[float, float]] = []
    while (at := time.monotonic() - started) < seconds:
        samples.append((at, chunk(additions)))
        time.sleep(PAUSE_S)
    return samples


def wakeup_round_trip_s(rounds: int) -> float:
    """Median seconds for one byte to reach a child process and come back (socket pair; ``rounds`` times)."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: echo every byte until the parent closes its end, and never return into the caller
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
            parent.close()
            while data := child.recv(1):
                child.send(data)
        finally:
            os._exit(0)
    child.close()
    times: list[float] = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            parent.send(b"x")
            if parent.recv(1) != b"x":
                raise RuntimeError("the echoing child process went away")
            times.append(time.perf_counter() - started)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.cpu_steadiness", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--chunk-additions", type=int, default=300_000)
    parser.add_argument("--slow-factor", type=float, default=1.3)
    parser.add_argument("--wakeups", type=int, default=20_000, help="cross-process round trips to time (0: none)")
    args = parser.parse_args(argv)
    if args.wakeups > 0:
        print(f"cross-process wake-up round trip median {wakeup_round_trip_s(args.wakeups) * 1e6:.1f} us")
    result = steadiness(measure(args.seconds, args.chunk_additions), args.slow_factor)
    print(
        f"chunk median {result.median_s * 1000:.1f} ms, p90 {result.p90_over_median:.2f}x the median; "
        f"share of chunks slower than {args.slow_factor}x the median, per second:"
    )
    print(" ".join(f"{round(100 * share)}" for share in result.slow_share_by_second))
    steady = sum(share == 0 for share in result.slow_share_by_second)
    print(f"seconds without a slow chunk: {steady} of {len(result.slow_share_by_second)}")


if __name__ == "__main__":
    main()
