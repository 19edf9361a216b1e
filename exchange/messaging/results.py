"""Fan-out of matching results from matchers to the api workers waiting for them.

The matcher publishes, after its commit, the ids of the orders whose state it changed on one Redis pub/sub
channel, with the committed state of each order PLACED in that transaction (:class:`PlacedState`: everything of
the order's view that the api did not write itself), so the api answers a new order's 201 without reading it
back. Each api *process* holds exactly one subscriber connection (not one per request) and resolves the futures
of the requests it has waiting. LISTEN/NOTIFY is not used because it does not pass pgbouncer's transaction
pooling.

A waiter registers *before* its order is committed, so a result published at any time after the commit is seen.
A lost message only costs the waiting request its bounded wait: the order itself is safe in Postgres.

Invariant: a :class:`PlacedState` is the order exactly as committed by the transaction that processed its place
command, and that transaction holds every trade the order has (all of them come from commands of the same
batch), so the api's view built from it equals the one read back. Orders that changed without being placed in
the transaction (a maker filled, a cancel) carry no state: their waiters read them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from uuid import UUID

import msgspec
import redis
import redis.asyncio


def results_channel(namespace: str) -> str:
    """The pub/sub channel of the results of the exchange of ``namespace`` (:mod:`exchange.messaging.names`)."""
    return f"{namespace}:order-results"


log = logging.getLogger(__name__)


class PlacedTrade(msgspec.Struct, array_like=True, frozen=True):
    trade_id: UUID
    price: int
    quantity: int
    counterparty_broker: str
    executed_us: int
    """Microseconds since the epoch (UTC), as stored."""


class PlacedState(msgspec.Struct, array_like=True, frozen=True):
    """A placed order's committed state: what its view holds beyond the fields the api wrote (see module doc)."""

    order_id: UUID
    status: str
    close_reason: str | None
    remaining: int | None
    """None: unchanged (the placed quantity), like every None here, as the matcher's ``UPDATE orders`` reads it."""
    price: int | None
    quantity: int | None
    updated_us: int
    trades: list[PlacedTrade]
    """Oldest first (command sequence, then match number): the order of the read-back."""


class _Results(msgspec.Struct, array_like=True):
    order_ids: list[UUID]
    placed: list[PlacedState]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Results)


def encode_results(order_ids: Iterable[UUID], placed: Iterable[PlacedState] = ()) -> bytes:
    return _encoder.encode(_Results(list(order_ids), list(placed)))


def decode_results(payload: bytes) -> tuple[list[UUID], dict[UUID, PlacedState]]:
    """Order ids and placed states of one message; a message of a matcher from before the states (comma-separated
    hex ids, during a rolling upgrade) gives ids only. Raises ``ValueError`` for anything else."""
    if not payload.startswith(b"["):
        return [UUID(hex=part.decode("ascii")) for part in payload.split(b",") if part], {}
    try:
        results = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed result message: {exc}") from exc
    return results.order_ids, {state.order_id: state for state in results.placed}


def publish_results(
    client: redis.Redis | redis.client.Pipeline,
    namespace: str,
    order_ids: Iterable[UUID],
    placed: Iterable[PlacedState] = (),
) -> None:
    """Tell every api process that these orders were processed, with the state of those placed in the
    transaction (called after the matcher's commit; on a pipeline, sent when the caller executes it)."""
    ids = list(order_ids)
    if ids:
        client.publish(results_channel(namespace), encode_results(ids, placed))


class ResultWaiter:
    """One per api process: a single pub/sub connection and a table of waiting requests.

    Invariant: every registered future is removed by the caller's ``finally`` (via :meth:`wait`), whether it was
    resolved, timed out or cancelled, so the table cannot grow without bound. Several requests may wait on the
    same order (e.g. two cancels asking for the result): each has its own future and all are resolved.
    """

    def __init__(self, client: redis.asyncio.Redis, namespace: Callable[[], Awaitable[str]]) -> None:
        """``namespace`` gives the exchange's namespace (raising while it cannot be known: the subscriber retries)."""
        self._client = client
        self._namespace = namespace
        self._waiting: dict[UUID, list[asyncio.Future[PlacedState | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.subscribed = False
        """The subscription is live now (the api's readiness reports it: without it every new order answers
        ``pending`` after its wait)."""

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

    def register(self, order_id: UUID) -> asyncio.Future[PlacedState | None]:
        """A future resolved when ``order_id``'s result arrives: with its :class:`PlacedState` when the transaction
        placed it, else None."""
        future: asyncio.Future[PlacedState | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(order_id, []).append(future)
        return future

    def discard(self, order_id: UUID, future: asyncio.Future[PlacedState | None]) -> None:
        futures = self._waiting.get(order_id)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._waiting[order_id]

    async def wait(self, order_id: UUID, future: asyncio.Future[PlacedState | None], timeout_s: float) -> bool:
        """Wait for the registered ``future`` up to ``timeout_s``. True if the result arrived (then
        ``future.result()`` is the order's :class:`PlacedState` or None)."""
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
                channel = results_channel(await self._namespace())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the api's database is down: its namespace is not known yet
                log.warning("result subscriber waits for the exchange's Redis namespace: %r", exc)
                await asyncio.sleep(1.0)
                continue
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                async with pubsub:
                    await pubsub.subscribe(channel)
                    self.subscribed = True
                    self._ready.set()
                    try:
                        async for message in pubsub.listen():
                            if message.get("type") == "message":
                                try:
                                    self._resolve(*decode_results(message["data"]))
                                except ValueError:  # one bad message must not cost the subscription
                                    log.warning("ignored a malformed result message", exc_info=True)
                    finally:  # however the subscription ends (lost, cancelled), and before the pause below
                        self.subscribed = False
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("result subscriber lost its Redis connection; reconnecting", exc_info=True)
                await asyncio.sleep(0.5)

    def _resolve(self, order_ids: list[UUID], placed: dict[UUID, PlacedState]) -> None:
        for order_id in order_ids:
            for future in self._waiting.get(order_id, ()):
                if not future.done():
                    future.set_result(placed.get(order_id))
