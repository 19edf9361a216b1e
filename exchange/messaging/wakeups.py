"""Coalesced wake-ups: tell a symbol's partition "this symbol has work", at most once per pending window.

A wake-up is sent only when ``SET wake:<symbol> NX PX <ttl>`` succeeds, so a burst of orders on one symbol costs
one dramatiq message, and the symbols of one partition woken together share one message ``match_<n>(*symbols)``
(the matcher processes them in one transaction). The matcher deletes the keys of a message's symbols *before* it
reads their command log: a command committed after that read finds its key gone and sends a new wake-up, so no
command can be left without one. If a message is lost anyway, the key expires after ``ttl`` and the sweeper
re-nudges symbols with old pending commands (one message per symbol: any number of symbols is a valid message).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
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
    return partition_message(partition_of(symbol, partitions), [symbol])


def partition_message(partition: int, symbols: Sequence[str]) -> dramatiq.Message[object]:
    """One message asking ``partition``'s matcher to process all of ``symbols`` (each must map to ``partition``):
    the actor processes them together, several books per transaction."""
    return dramatiq.Message(
        queue_name=matching_queue(partition),
        actor_name=matching_actor(partition),
        args=tuple(symbols),
        kwargs={},
        options={},
    )


def group_by_partition(symbols: Iterable[str], partitions: int) -> dict[int, list[str]]:
    """The distinct ``symbols`` by partition, each list in first-seen order."""
    groups: dict[int, list[str]] = {}
    for symbol in dict.fromkeys(symbols):
        groups.setdefault(partition_of(symbol, partitions), []).append(symbol)
    return groups


def send_wakeup(broker: BrokerLike, symbol: str, partitions: int) -> None:
    """Unconditionally enqueue a match message for one symbol (sweeper, tests)."""
    broker.enqueue(match_message(symbol, partitions))


async def wake_async(client: redis.asyncio.Redis, broker: BrokerLike, symbols: Iterable[str], partitions: int) -> int:
    """Coalesced wake-ups of several symbols from an async caller (api): one Redis round trip for all the
    ``SET NX`` checks, then ONE message per partition naming every symbol of it whose key was free. Returns the
    number of symbols woken."""
    wanted = list(dict.fromkeys(symbols))
    if not wanted:
        return 0
    async with client.pipeline(transaction=False) as pipe:
        for symbol in wanted:
            pipe.set(wake_key(symbol), b"1", nx=True, px=WAKE_TTL_MS)
        claimed = await pipe.execute()
    due = [symbol for symbol, ok in zip(wanted, claimed, strict=True) if ok]
    if due:
        groups = list(group_by_partition(due, partitions).items())
        sent: list[str] = []
        try:
            # dramatiq's enqueue is synchronous (a blocking Redis round trip): run it in a worker thread so the
            # event loop keeps serving the other requests meanwhile. Profiling showed it blocking ~10% of the loop.
            await asyncio.to_thread(_send_wakeups, broker, groups, sent)
        except Exception:
            # Free the keys of the symbols left without a message, so the next command wakes them at once
            # instead of after the key's TTL (best effort: Redis may be the thing that failed).
            done = set(sent)
            unsent = [wake_key(symbol) for symbol in due if symbol not in done]
            with contextlib.suppress(redis.RedisError):
                await client.delete(*unsent)
            raise
    return len(due)


def _send_wakeups(broker: BrokerLike, groups: list[tuple[int, list[str]]], sent: list[str]) -> None:
    for partition, symbols in groups:
        broker.enqueue(partition_message(partition, symbols))
        sent.extend(symbols)


def clear_wakeups(client: redis.Redis, symbols: Sequence[str]) -> None:
    """Called by the matcher before it reads the command log (see the module docstring for why): one round trip
    for all the symbols of a message."""
    if symbols:
        client.delete(*(wake_key(symbol) for symbol in symbols))
