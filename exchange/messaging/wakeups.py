"""Coalesced wake-ups: tell a symbol's partition "this symbol has work", at most once per pending window.

A wake-up is sent only when ``SET wake:<symbol> NX PX <ttl>`` succeeds, so a burst of orders on one symbol costs
one dramatiq message. The matcher deletes the key *before* it reads the command log: a command committed after
that read finds the key gone and sends a new wake-up, so no command can be left without one. If a message is
lost anyway, the key expires after ``ttl`` and the sweeper re-nudges symbols with old pending commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

import dramatiq
import redis
import redis.asyncio

from exchange.messaging.partitions import matching_actor, matching_queue, partition_of

WAKE_KEY_PREFIX = "exchange:wake:"
WAKE_TTL_MS = 1000


def wake_key(symbol: str) -> str:
    return f"{WAKE_KEY_PREFIX}{symbol}"


class BrokerLike(Protocol):
    def enqueue(self, message: dramatiq.Message[object], *, delay: int | None = None) -> object: ...


def match_message(symbol: str, partitions: int) -> dramatiq.Message[object]:
    """The dramatiq message that asks partition ``crc32(symbol) % partitions`` to process ``symbol``."""
    n = partition_of(symbol, partitions)
    return dramatiq.Message(
        queue_name=matching_queue(n),
        actor_name=matching_actor(n),
        args=(symbol,),
        kwargs={},
        options={},
    )


def send_wakeup(broker: BrokerLike, symbol: str, partitions: int) -> None:
    """Unconditionally enqueue a match message (sweeper, tests)."""
    broker.enqueue(match_message(symbol, partitions))


async def wake_async(client: redis.asyncio.Redis, broker: BrokerLike, symbols: Iterable[str], partitions: int) -> int:
    """Coalesced wake-ups of several symbols from an async caller (api): one Redis round trip for all the
    ``SET NX`` checks, then one message per symbol whose key was free. Returns the number of messages sent."""
    wanted = list(dict.fromkeys(symbols))
    if not wanted:
        return 0
    async with client.pipeline(transaction=False) as pipe:
        for symbol in wanted:
            pipe.set(wake_key(symbol), b"1", nx=True, px=WAKE_TTL_MS)
        claimed = await pipe.execute()
    due = [symbol for symbol, ok in zip(wanted, claimed, strict=True) if ok]
    if due:
        # dramatiq's enqueue is synchronous (a blocking Redis round trip): run it in a worker thread so the event
        # loop keeps serving the other requests meanwhile. Profiling showed it blocking ~10% of the loop.
        await asyncio.to_thread(_send_wakeups, broker, due, partitions)
    return len(due)


def _send_wakeups(broker: BrokerLike, symbols: list[str], partitions: int) -> None:
    for symbol in symbols:
        send_wakeup(broker, symbol, partitions)


def clear_wakeup(client: redis.Redis, symbol: str) -> None:
    """Called by the matcher before it reads the command log (see the module docstring for why)."""
    client.delete(wake_key(symbol))
