"""Matcher actors: one dramatiq actor per partition queue ``matching.<n>`` (run with ``exchange matcher``).

A message only says "this partition has work" (``match_<n>(*symbols)``: the api names the symbols it woke, the
sweeper one); the actor drains those and every symbol woken on the partition while it works, under their advisory
locks, several books per transaction (:func:`exchange.matching.service.drain`), holding the partition so that one
message at a time is in flight for it (:mod:`exchange.messaging.wakeups`). A duplicate, late or lost message is
harmless: a duplicate finds nothing pending, a lost one is re-sent by the sweeper. After each committed
transaction the actor publishes the changed orders to waiting api workers. A symbol whose processing failed is left
alone for a backoff, and woken by the matcher itself when it ends (:class:`~exchange.messaging.wakeups.RetryWakeups`).
"""

from __future__ import annotations

import logging
import os
import time

import dramatiq
import redis

from exchange.config import Settings
from exchange.heap import Keeper
from exchange.matching.service import BatchResult, BookCache, drain
from exchange.matching.store import matcher_engine
from exchange.messaging.broker import SettledHeap, make_broker
from exchange.messaging.names import process_namespace
from exchange.messaging.partitions import matching_actor, matching_queue
from exchange.messaging.results import publish_results
from exchange.messaging.wakeups import PartitionWakeups, RetryWakeups, hold_partition, partition_message, wake
from exchange.observability import metrics
from exchange.observability.context import request_id_var
from exchange.observability.logs import configure_logging
from exchange.webhooks.queue import add_hint

log = logging.getLogger("exchange.matcher")

settings = Settings.from_env()
configure_logging("matcher", level=settings.log_level, fmt=settings.log_format, replace=True)
metrics.start_worker_metrics_server("matcher", settings.metrics_port, settings.metrics_bind)
broker = make_broker(
    settings.redis_url, settings.partitions, process_namespace(settings.redis_namespace, settings.pooled_database_url)
)
broker.add_middleware(SettledHeap())
# One connection per dramatiq thread (each may hold one symbol's lock) plus a spare for the one in rollback.
_threads = int(os.environ.get("EXCHANGE_MATCHER_THREADS", "1"))
_engine = matcher_engine(settings.pooled_database_url, pool_size=_threads + 1)
_redis: redis.Redis = broker.client  # the broker's own: the after-commit round trip also enqueues on it (add_hint)
_cache = BookCache()
_wakeups = PartitionWakeups(_redis, broker.namespace, linger_s=settings.matcher_linger_ms / 1000)
_retries = RetryWakeups(lambda symbols: wake(broker, symbols, settings.partitions))
"""Wakes each symbol left pending for a backoff when the backoff ends (see :func:`_drain`)."""
_keep_heap = Keeper()
"""The cached books only grow while the matcher runs: what survived is frozen once a second (``exchange.heap``), so
no collection walks them again."""
HOLD_S = 0.5
"""Longest a message keeps its partition before handing what is left back to the queue."""


def _after_commit(results: list[BatchResult], seconds: float, *, release: int | None) -> list[str] | None:
    """Publish what one transaction (of one or several books) committed, then report it (``seconds``: its
    duration). With ``release`` (a partition; the drain's last transaction), also take what was woken on it
    meanwhile (or, when nothing was and the matcher does not linger, release it) and return what was taken. The
    results, the webhook hint and the take go in ONE round trip (on the broker's client), before anything else:
    waiters are answered first.

    Once the take has run nothing here raises (what it took would be lost until the sweeper): only a failed round
    trip does, before anything of it is known."""
    taken = _publish(results, release)
    try:
        _report(results, seconds)
    except Exception:
        log.exception("could not report a committed transaction")
    return taken


def _publish(results: list[BatchResult], release: int | None) -> list[str] | None:
    """The after-commit round trip (see :func:`_after_commit`): the take's symbols, or None without ``release``."""
    order_ids = [order_id for result in results for order_id in result.order_ids]
    has_events = any(result.event_ids for result in results)
    if not order_ids and not has_events and release is None:
        return None
    with _redis.pipeline(transaction=False) as pipe:
        publish_results(pipe, broker.namespace, order_ids, [state for result in results for state in result.placed])
        hint = add_hint(pipe, broker) if has_events else None
        if release is not None:
            _wakeups.add_take_or_release(pipe, release)
        replies = pipe.execute(raise_on_error=False)
    taken = PartitionWakeups.taken(replies.pop()) if release is not None else None
    if hint is not None:
        try:
            broker.guarded_sent(hint, replies.pop())
        except Exception:
            # The events are committed: the sweeper hints about undelivered ones, so this only costs a delay.
            log.warning("could not enqueue a webhook delivery hint", exc_info=True)
    if replies and isinstance(replies[0], Exception):  # the waiters time out and read their orders back
        log.warning("could not publish results", exc_info=replies[0])
    return taken


def _report(results: list[BatchResult], seconds: float) -> None:
    """The transaction's metrics and its ``matched`` line. A book that closed a share of its expiry backlog applied
    no command but changed orders (``order_ids``): its transaction is logged and timed like any other (it is the one
    nearest the idle limit), and counted in the batch sizes only by its commands."""
    applied = [result for result in results if result.commands or result.order_ids]
    for result in results:
        if result.rebuilt:
            metrics.BOOK_REBUILDS.inc()
        if result.commands:
            metrics.MATCH_TRADES.inc(result.trades)
    if applied:  # per transaction: its commands, its books, its duration
        if commands := sum(result.commands for result in applied):
            metrics.MATCH_BATCH_SIZE.observe(commands)
        metrics.MATCH_SYMBOLS.observe(len(applied))
        metrics.MATCH_BATCH_LATENCY.observe(seconds)
        # One line per transaction, not per book: at closed loop 64 a transaction holds ~3 books, and each line
        # costs the matcher, dramatiq's log relay and whatever collects stderr. order_ids: with coalesced wake-ups
        # a transaction spans several requests; logs join on order id exactly.
        log.info(
            "matched books=%d commands=%d trades=%d events=%d rebuilt=%d symbols=%s",
            len(applied),
            sum(result.commands for result in applied),
            sum(result.trades for result in applied),
            sum(len(result.event_ids) for result in applied),
            sum(result.rebuilt for result in applied),
            ",".join(result.symbol for result in applied),
            extra={
                "books": [
                    {
                        "symbol": result.symbol,
                        "commands": result.commands,
                        "trades": result.trades,
                        "events": len(result.event_ids),
                        "rebuilt": result.rebuilt,
                    }
                    for result in applied
                ],
                "order_ids": [str(o) for result in applied for o in result.order_ids],
            },
        )


def _drain(partition: int, symbols: list[str], deadline: float) -> list[str] | None:
    """Drain ``symbols`` (:func:`~exchange.matching.service.drain`), publishing after each commit; returns what the
    last transaction's round trip took for ``partition`` (see :func:`hold_partition`). Past ``deadline``, the
    hold's end, it stops after the transaction in progress and returns what the drain had left, which
    :func:`hold_partition` hands off: a backlog (after an outage, thousands of commands of one book) would otherwise
    hold the worker's thread, and the partition, for as many transactions as it takes."""
    taken = None
    started = time.perf_counter()
    for round_ in drain(_engine, _cache, symbols):
        for result in round_.results:
            if result.retry_at is not None:  # left pending for a backoff: no one else wakes it before the sweeper
                _retries.schedule(result.symbol, result.retry_at)
        taken = _after_commit(round_.results, time.perf_counter() - started, release=partition if round_.last else None)
        # The message's request id (RequestIdMiddleware) is its request's: only the hold's first transaction can
        # hold that request's command. Later ones apply what was woken meanwhile, by requests whose ids the matcher
        # never sees (wake-ups are coalesced): their lines, hints and hand-off carry no id rather than a wrong one.
        request_id_var.set(None)
        _keep_heap()
        if not round_.last and time.monotonic() >= deadline:
            return round_.left
        started = time.perf_counter()
    return taken


def _hand_off(partition: int, symbols: list[str]) -> None:
    broker.enqueue(partition_message(partition, symbols))


def _partition_actor(partition: int) -> dramatiq.Actor[[str], None]:
    def match(*symbols: str) -> None:
        hold_partition(
            _wakeups,
            partition,
            symbols,
            process=lambda todo, deadline: _drain(partition, todo, deadline),
            hand_off=_hand_off,
            hold_s=HOLD_S,
        )

    # `send_with_options(queue_name=...)` does not route in dramatiq: one actor per partition queue does.
    return dramatiq.actor(actor_name=matching_actor(partition), queue_name=matching_queue(partition), max_retries=10)(
        match
    )


actors = [_partition_actor(n) for n in range(settings.partitions)]
