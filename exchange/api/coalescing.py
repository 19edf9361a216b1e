"""Group commit for an api process: concurrent requests' work runs as one batch (one transaction, one query).

A :class:`Coalescer` hands the items submitted by concurrent requests to ``run_batch`` together. There is no
timer: a batch starts as soon as one of ``max_concurrent`` slots is free, so an idle exchange adds no latency,
and batches grow only while every slot is busy — exactly when amortising a round trip and a commit pays.

Invariants:

* Every submitted item is in exactly one batch, and its submitter gets that batch's outcome for it: a result, or
  an exception (the batch's own, when ``run_batch`` raised — e.g. the database is down).
* At most ``max_concurrent`` batches run at once; a batch holds at most ``max_batch`` items, taken in submission
  order.
* A submitter that stops waiting (client gone) does not stop its batch: its item was possibly committed already,
  exactly as if the request had been cancelled after a one-item commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

BatchRunner = Callable[[Sequence[In]], Awaitable[Sequence[Out | BaseException]]]


class Coalescer(Generic[In, Out]):
    """Runs ``run_batch(items) -> outcomes`` (one outcome per item, same order) over concurrently submitted items."""

    def __init__(self, run_batch: BatchRunner[In, Out], *, max_concurrent: int = 4, max_batch: int = 200) -> None:
        if max_concurrent < 1 or max_batch < 1:
            raise ValueError("max_concurrent and max_batch must be >= 1")
        self._run_batch = run_batch
        self._max_concurrent = max_concurrent
        self._max_batch = max_batch
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: In) -> Out:
        """Queue ``item`` and wait for its outcome (raised if it is an exception)."""
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._pending and len(self._running) < self._max_concurrent:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start_batches()

    async def _run(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            outcomes = await self._run_batch([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} items returned {len(outcomes)} outcomes")
        except BaseException as exc:  # every waiter must hear of it, whatever it is
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
