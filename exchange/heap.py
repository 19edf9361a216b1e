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

A process whose long-lived heap keeps *growing* while it runs (the matcher: every resting order of its cached
books is about five tracked objects) also uses a :class:`Keeper`: after each transaction, at most once per
:data:`KEEP_EVERY_S`, it collects what is not frozen and freezes what survived, so that the collected generations
only ever hold what is younger than a second and no collection walks the books again. Without it a full
collection walks all of them each time they have grown by a quarter: 162 ms at 100,000 resting orders, 1.2 s at
1,000,000 (``python -m ops.bench_heap``), with every book of the partition waiting.

Invariant: only what is alive at the call is frozen; reference cycles made afterwards are still collected (by the
same three generations, the oldest still only when enough survivors accumulated). A frozen object is freed by
reference counting like any other; only a reference cycle that is still alive when it is frozen and becomes
garbage later is never freed. So call :func:`settle` only after start-up, when what exists is meant to stay, and
use a :class:`Keeper` only in a process whose long-lived objects form no cycles (the matcher's collections found
no garbage at all over a ``--scale 100`` run; ``tests/integration/test_matcher_heap.py`` keeps it that way).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("exchange.heap")

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) of tracked objects between two collections of the youngest generation
(CPython's default: 700). The older generations keep their default ratios (each runs every 10 of the one below)."""


KEEP_EVERY_S = 1.0
"""A :class:`Keeper` freezes at most this often: each keep's collection walks what survived since the last one."""

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


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic collection inside the block (the collector is enabled again after it, if it was before).

    For work that makes a great many long-lived objects at once, and none in cycles: the matcher's rebuild of a
    book (some five tracked objects per resting order). Left on, the collector walks everything not frozen each time
    it has grown by a quarter: a rebuild of 400,000 orders triggered a dozen full collections, 7 s of a 10-s rebuild
    on a busy machine, the longest over a second, in the middle of a transaction that may sit idle only
    :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS`. Collection resumes after the block (the matcher's
    :class:`Keeper` then freezes the rebuilt book once). Another thread may enable the collector meanwhile (its own
    block ended): that only costs this block its saving, and the collector is never left disabled."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Keeper:
    """Keeps a growing heap frozen (see the module docstring): call it after each unit of work (the matcher: each
    committed transaction). Safe to call from several threads: one keeps, the others go on at once."""

    def __init__(self, every_s: float = KEEP_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        """Collect everything not frozen, then freeze what is left, if ``every_s`` has passed since the last keep
        (or there was none). Returns whether it did."""
        if not self._due() or not self._lock.acquire(blocking=False):
            return False  # not yet, or another thread is keeping right now
        try:
            if not self._due():
                return False  # another thread kept while this one waited for the lock
            # A full collection, not a young one: objects promoted to the oldest generation since the last keep
            # are walked too (they are all that is in it), so no cycle that is garbage already gets frozen.
            gc.collect()
            gc.freeze()
            self._last = self._clock()
        finally:
            self._lock.release()
        return True

    def _due(self) -> bool:
        return self._last is None or self._clock() - self._last >= self._every_s


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
