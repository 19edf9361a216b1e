"""Fan-out of matching results from matchers to the api workers waiting for them.

The matcher publishes, after its commit, the ids of the orders whose state it changed on one Redis pub/sub
channel. Each api *process* holds exactly one subscriber connection (not one per request) and resolves the
futures of the requests it has waiting. LISTEN/NOTIFY is not used because it does not pass pgbouncer's
transaction pooling.

A waiter registers *before* its order is committed, so a result published at any time after the commit is seen.
A lost message only costs the waiting request its bounded wait: the order itself is safe in Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from uuid import UUID

import redis
import redis.asyncio

RESULTS_CHANNEL = "exchange:order-results"

log = logging.getLogger(__name__)


def encode_order_ids(order_ids: Iterable[UUID]) -> bytes:
    return b",".join(o.hex.encode("ascii") for o in order_ids)


def decode_order_ids(payload: bytes) -> list[UUID]:
    return [UUID(hex=part.decode("ascii")) for part in payload.split(b",") if part]


def publish_results(client: redis.Redis, order_ids: Iterable[UUID]) -> None:
    """Tell every api process that these orders were processed (called after the matcher's commit)."""
    payload = encode_order_ids(order_ids)
    if payload:
        client.publish(RESULTS_CHANNEL, payload)


class ResultWaiter:
    """One per api process: a single pub/sub connection and a table of waiting requests.

    Invariant: every registered future is removed by the caller's ``finally`` (via :meth:`wait`), whether it was
    resolved, timed out or cancelled, so the table cannot grow without bound. Several requests may wait on the
    same order (e.g. two cancels asking for the result): each has its own future and all are resolved.
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._waiting: dict[UUID, list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="result-waiter")
        # Subscribe before serving: a request must not register against a connection that is not listening yet.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout=5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def register(self, order_id: UUID) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(order_id, []).append(future)
        return future

    def discard(self, order_id: UUID, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(order_id)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._waiting[order_id]

    async def wait(self, order_id: UUID, future: asyncio.Future[None], timeout_s: float) -> bool:
        """Wait for the registered ``future`` up to ``timeout_s``. True if the result arrived."""
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except TimeoutError:
            return False
        finally:
            self.discard(order_id, future)
        return True

    async def _run(self) -> None:
        # Reconnect forever: a Redis restart must not leave this process deaf. Waiters time out meanwhile.
        while True:
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                async with pubsub:
                    await pubsub.subscribe(RESULTS_CHANNEL)
                    self._ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._resolve(decode_order_ids(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("result subscriber lost its Redis connection; reconnecting", exc_info=True)
                await asyncio.sleep(0.5)

    def _resolve(self, order_ids: list[UUID]) -> None:
        for order_id in order_ids:
            for future in self._waiting.get(order_id, ()):
                if not future.done():
                    future.set_result(None)
