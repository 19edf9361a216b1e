"""The cyclic garbage collector of a long-running exchange process, set once its long-lived objects exist.

CPython's cyclic collector walks every tracked object of the generations it collects. A full collection of an api
worker's heap (some 100,000 objects once Litestar, SQLAlchemy, dramatiq and the app are loaded) takes ~50 ms on the
project's machines (``gc.collect()`` after ``create_app()``): a stall of the whole event loop, every request in
flight waiting, each time the collector finds a full pass due. Those objects live as long as the process, so walking
them again and again finds nothing. :func:`settle` collects once, then moves every object alive into the permanent
generation (``gc.freeze``: never walked again), and lets the youngest generation grow to
:data:`YOUNG_THRESHOLD` allocations between collections instead of 700, so that the churn of requests and batches
(mostly freed by reference counting anyway) triggers the collector less often.

With ``on_pause``, every collection from the settling one on is timed (``gc.callbacks``) and reported with its
generation (the servers export it as ``exchange_gc_pause_seconds``), by a thread of its own within
:data:`REPORT_EVERY_S`, never from inside the collector: a collection may start wherever a tracked object is
allocated, including in a thread that holds a lock ``on_pause`` takes (prometheus-client's multiprocess values
share one non-reentrant lock, and create objects under it), and taking it again there would deadlock.

Invariant: only what is alive at the call is frozen; reference cycles made afterwards are still collected (by the
same three generations, the oldest still only when enough survivors accumulated). A frozen object that later
becomes garbage in a cycle is never freed: call :func:`settle` only after start-up, when what exists is meant to
stay.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("exchange.heap")

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) of tracked objects between two collections of the youngest generation
(CPython's default: 700). The older generations keep their default ratios (each runs every 10 of the one below)."""


REPORT_EVERY_S = 1.0
"""How often the collections timed since the last report are handed to ``on_pause``."""

PauseObserver = Callable[[int, float], None]
"""Called for each collection with its generation (0-2) and its duration in seconds."""


def settle(on_pause: PauseObserver | None = None) -> None:
    """Collect what start-up left behind, freeze the rest, raise the youngest generation's threshold. With
    ``on_pause``, every collection from this first full one on is timed and reported."""
    if on_pause is not None:
        timer = _Timer()
        gc.callbacks.append(timer)
        threading.Thread(target=_report, args=(timer, on_pause), name="gc-pauses", daemon=True).start()
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    log.info(
        "heap settled: %d objects frozen, youngest generation collected every %d",
        gc.get_freeze_count(),
        YOUNG_THRESHOLD,
    )


class _Timer:
    """A ``gc.callbacks`` entry: the collector calls it at the start and at the end of each collection, in the
    thread that triggered it and with the GIL held, and collections never overlap, so one start time suffices. It
    only notes the pause (a bounded queue: the oldest are dropped if the reporter ever fell that far behind)."""

    def __init__(self) -> None:
        self.pauses: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((int(info["generation"]), time.perf_counter() - self._started))


def _report(timer: _Timer, on_pause: PauseObserver) -> None:
    while True:
        time.sleep(REPORT_EVERY_S)
        while timer.pauses:
            generation, seconds = timer.pauses.popleft()
            try:
                on_pause(generation, seconds)
            except Exception:
                log.exception("could not report a garbage collection's pause")
