"""A value recomputed at most once per ``ttl_s`` per api process, however many requests ask for it.

The ops page (every open tab reloads it every few seconds) and the unauthenticated ``/metrics`` read aggregates
from Postgres; without this, each request ran them again, and concurrent requests ran them concurrently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedResult(Generic[T]):
    """The last computed value, served while younger than ``ttl_s`` (counted from when its computation ended).

    Invariants: at most one computation runs at a time; callers arriving while one runs await that one and get its
    value or its exception. A failure is never kept: the next caller computes again. A caller that is cancelled does
    not cancel the computation the others await.
    """

    __slots__ = ("_fresh", "_running", "ttl_s")

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._fresh: tuple[float, T] | None = None
        self._running: asyncio.Task[T] | None = None

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        fresh = self._fresh
        if fresh is not None and time.monotonic() < fresh[0]:
            return fresh[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._compute(compute))
            # Retrieved here too, so a failure every caller stopped waiting for is not logged as never retrieved.
            self._running.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._running)

    async def _compute(self, compute: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await compute()
            self._fresh = (time.monotonic() + self.ttl_s, value)
            return value
        finally:
            self._running = None
