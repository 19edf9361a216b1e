"""The ops views' shared reads (:class:`exchange.ops.cache.SharedResult`): one computation at a time, its value
served for ``ttl_s``, a failure shared by the callers waiting for it and never kept."""

from __future__ import annotations

import asyncio

import pytest

from exchange.ops.cache import SharedResult


class Counting:
    """A computation that counts its runs and waits for ``release`` before answering the run number."""

    def __init__(self, fail: bool = False) -> None:
        self.runs = 0
        self.fail = fail
        self.release = asyncio.Event()

    async def __call__(self) -> int:
        self.runs += 1
        await self.release.wait()
        if self.fail:
            raise RuntimeError(f"run {self.runs} failed")
        return self.runs


def test_concurrent_callers_share_one_computation() -> None:
    async def scenario() -> tuple[list[int], int]:
        shared: SharedResult[int] = SharedResult(ttl_s=60)
        compute = Counting()
        callers = [asyncio.create_task(shared.get(compute)) for _ in range(10)]
        await asyncio.sleep(0)
        compute.release.set()
        return list(await asyncio.gather(*callers)), compute.runs

    values, runs = asyncio.run(scenario())

    assert (values, runs) == ([1] * 10, 1)


def test_a_value_is_served_until_it_is_ttl_old_then_computed_again() -> None:
    async def scenario() -> list[int]:
        shared: SharedResult[int] = SharedResult(ttl_s=0.2)
        compute = Counting()
        compute.release.set()
        first, second = await shared.get(compute), await shared.get(compute)
        await asyncio.sleep(0.25)
        return [first, second, await shared.get(compute)]

    assert asyncio.run(scenario()) == [1, 1, 2]


def test_a_failure_reaches_every_waiting_caller_and_is_not_kept() -> None:
    async def scenario() -> tuple[list[BaseException | int], int]:
        shared: SharedResult[int] = SharedResult(ttl_s=60)
        failing = Counting(fail=True)
        callers = [asyncio.create_task(shared.get(failing)) for _ in range(3)]
        await asyncio.sleep(0)
        failing.release.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        working = Counting()
        working.release.set()
        return [*outcomes, await shared.get(working)], failing.runs

    outcomes, runs = asyncio.run(scenario())

    assert runs == 1
    assert [str(o) for o in outcomes[:3]] == ["run 1 failed"] * 3
    assert outcomes[3] == 1


def test_a_cancelled_caller_does_not_cancel_the_computation_others_wait_for() -> None:
    async def scenario() -> tuple[int, int]:
        shared: SharedResult[int] = SharedResult(ttl_s=60)
        compute = Counting()
        leaving = asyncio.create_task(shared.get(compute))
        staying = asyncio.create_task(shared.get(compute))
        await asyncio.sleep(0)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        compute.release.set()
        return await staying, compute.runs

    assert asyncio.run(scenario()) == (1, 1)
