"""The cyclic garbage collector of a long-running exchange process, set once its long-lived objects exist.

CPython's cyclic collector walks every tracked object of the generations it collects. A full collection of an api
worker's heap (some 100,000 objects once Litestar, SQLAlchemy, dramatiq and the app are loaded) takes ~50 ms on the
project's machines (``gc.collect()`` after ``create_app()``): a stall of the whole event loop, every request in
flight waiting, each time the collector finds a full pass due. Those objects live as long as the process, so walking
them again and again finds nothing. :func:`settle` collects once, then moves every object alive into the permanent
generation (``gc.freeze``: never walked again), and lets the youngest generation grow to
:data:`YOUNG_THRESHOLD` allocations between collections instead of 700, so that the churn of requests and batches
(mostly freed by reference counting anyway) triggers the collector less often.

Invariant: only what is alive at the call is frozen; reference cycles made afterwards are still collected (by the
same three generations, the oldest still only when enough survivors accumulated). A frozen object that later
becomes garbage in a cycle is never freed: call :func:`settle` only after start-up, when what exists is meant to
stay.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("exchange.heap")

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) of tracked objects between two collections of the youngest generation
(CPython's default: 700). The older generations keep their default ratios (each runs every 10 of the one below)."""


def settle() -> None:
    """Collect what start-up left behind, freeze the rest, raise the youngest generation's threshold."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    log.info(
        "heap settled: %d objects frozen, youngest generation collected every %d",
        gc.get_freeze_count(),
        YOUNG_THRESHOLD,
    )
