"""The group-commit coalescer: concurrent submissions share batches, and each submitter gets its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from exchange.api.coalescing import Coalescer


class Recorder:
    """A batch runner that records its batches and holds each one until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def run(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.release.wait()
        self.running -= 1
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_items_submitted_while_every_slot_is_busy_share_the_next_batch() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, max_concurrent=1, max_batch=100)
    first = asyncio.create_task(coalescer.submit(1))
    await _settle()
    rest = [asyncio.create_task(coalescer.submit(i)) for i in range(2, 7)]
    await _settle()
    recorder.release.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40, 50, 60]
    assert recorder.batches == [[1], [2, 3, 4, 5, 6]]


@pytest.mark.anyio
async def test_a_lone_item_starts_at_once_without_waiting_for_company() -> None:
    recorder = Recorder()
    recorder.release.set()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run)
    assert await asyncio.wait_for(coalescer.submit(3), timeout=1) == 30
    assert recorder.batches == [[3]]


@pytest.mark.anyio
async def test_no_more_than_max_concurrent_batches_run_and_none_exceeds_max_batch() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, max_concurrent=2, max_batch=3)
    tasks = [asyncio.create_task(coalescer.submit(i)) for i in range(1, 12)]
    await _settle()
    assert recorder.running == 2
    recorder.release.set()
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(1, 12)]
    assert recorder.most_running == 2
    assert all(len(b) <= 3 for b in recorder.batches)
    assert sorted(i for b in recorder.batches for i in b) == list(range(1, 12))


@pytest.mark.anyio
async def test_an_item_failing_alone_fails_only_its_own_submitter() -> None:
    recorder = Recorder()
    recorder.release.set()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, max_concurrent=1)
    results = await asyncio.gather(*(coalescer.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert (results[0], results[2]) == (10, 30)
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "bad -2"


@pytest.mark.anyio
async def test_a_failed_batch_fails_every_submitter_in_it_and_later_batches_still_run() -> None:
    gate = asyncio.Event()

    async def run(items: Sequence[int]) -> list[int | BaseException]:
        await gate.wait()
        if 1 in items:
            raise ConnectionError("database down")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(run, max_concurrent=1)
    first = asyncio.create_task(coalescer.submit(0))
    await _settle()
    failing = [asyncio.create_task(coalescer.submit(i)) for i in (1, 2)]
    await _settle()
    gate.set()
    assert await first == 0
    results = await asyncio.gather(*failing, return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    assert await coalescer.submit(5) == 5


@pytest.mark.anyio
async def test_a_submitter_that_stops_waiting_does_not_stop_its_batch() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, max_concurrent=1)
    gone = asyncio.create_task(coalescer.submit(1))
    await _settle()
    gone.cancel()
    stays = asyncio.create_task(coalescer.submit(2))
    await _settle()
    recorder.release.set()
    assert await stays == 20
    assert recorder.batches == [[1], [2]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
