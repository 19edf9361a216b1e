# ruff: noqa: S311  (seeded pseudo-random traffic, not cryptography)
"""Sender worker processes: each runs one asyncio loop (uvloop when available) over a keep-alive connection pool.

Open loop: the worker walks its part of the precomputed schedule and starts every request at its scheduled
instant, whether or not earlier ones have answered (no coordinated omission). It records, per request, the
schedule lag (the moment the request is written, after any wait for one of the worker's own connections -
scheduled time) and the latency from the SCHEDULED time to the response. A request that is never written (it timed
out waiting for a connection, or connecting failed) has the lag of the moment it was given up.

Closed loop: ``clients`` coroutines each keep exactly one order in flight for the duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from exchange.heap import settle
from ops.bench import model as m
from ops.bench.http import HttpError, Pool, install_uvloop
from ops.bench.priority import raise_priority

# Responses that are expected outcomes, not errors: no trade yet on a symbol; cancel of an order a seed-style
# server no longer knows (or refuses because it is closed).
TOLERATED = {m.PRICE: {404}, m.CANCEL: {404, 409, 410, 422}}
MAX_KNOWN_ORDERS_PER_BROKER = 2000


@dataclass
class WorkerConfig:
    index: int
    base_url: str
    auth: dict[int, bytes]  # broker index -> prebuilt "Authorization: Bearer …\r\n"
    model: m.Model
    events: list[m.Event]
    t0: float  # time.monotonic() of the run's start (CLOCK_MONOTONIC is system-wide on Linux)
    duration_s: float
    timeout_s: float
    seed: int
    warm_connections: int = 4
    max_connections: int = 128
    closed_loop_clients: int = 0
    brokers: list[int] = field(default_factory=list)  # closed loop: brokers this worker sends for
    nice: int = 0  # the worker process's priority (ops.bench.priority); 0 leaves it
    placed_before: dict[int, str] = field(default_factory=dict)
    """The orders placed before the run (the setup's) that this worker's brokers cancel in it: order number -> id."""
    known_before: dict[int, list[str]] = field(default_factory=dict)
    """Ids of the orders the setup placed for this worker's brokers (broker -> ids): a status read early in the run
    reads one of these rather than being skipped for want of an answered order."""


@dataclass
class WorkerResult:
    index: int
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    lags_ms: list[float] = field(default_factory=list)
    order_to_fill_ms: list[float] = field(default_factory=list)
    order_times: list[tuple[str, float, float]] = field(default_factory=list)
    """Each new order answered 2xx: (order id, scheduled send, answer), wall-clock epoch seconds."""
    market_orders: list[tuple[str, float]] = field(default_factory=list)
    """(order id, scheduled send, epoch s) of each accepted market order: one never rests, so its first fill, if
    any, is the one its own arrival made (a crossing limit that found nothing to cross rests, and its first fill
    may come minutes later, when another order crosses it)."""
    order_states: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    orders_accepted: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    peak_connections: int = 0
    connections_opened: int = 0
    waited_for_connection: int = 0
    waited_for_order: int = 0
    """Cancels scheduled before their order was answered, which waited for that answer."""
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    """CPU seconds (user + system) the worker process used for its requests: its loop's start (warming connections
    before the run) to its end (the answers that arrive after the run)."""
    priority: str = ""
    """What :func:`ops.bench.priority.raise_priority` did in the worker process."""

    def plain(self) -> WorkerResult:
        """A picklable copy (no lambdas in the defaultdicts)."""
        return WorkerResult(
            index=self.index,
            latencies_ms=dict(self.latencies_ms),
            statuses={k: dict(v) for k, v in self.statuses.items()},
            lags_ms=self.lags_ms,
            order_to_fill_ms=self.order_to_fill_ms,
            order_times=self.order_times,
            market_orders=self.market_orders,
            order_states=dict(self.order_states),
            orders_accepted=self.orders_accepted,
            skipped=dict(self.skipped),
            peak_connections=self.peak_connections,
            connections_opened=self.connections_opened,
            waited_for_connection=self.waited_for_connection,
            waited_for_order=self.waited_for_order,
            elapsed_s=self.elapsed_s,
            cpu_s=self.cpu_s,
            priority=self.priority,
        )


def order_body(model: m.Model, event: m.Event, document: str = "12345678900") -> bytes:
    body: dict[str, Any] = {
        "document_number": document,
        "side": m.SIDE_NAMES[event.side],
        "order_type": "market" if event.order_class == m.MARKET else "limit",
        "symbol": model.symbols[event.symbol],
        "quantity": event.quantity,
    }
    if event.order_class != m.MARKET:
        body["price"] = event.price
    return msgspec.json.encode(body)


def _has_fill(doc: dict[str, Any]) -> bool:
    trades = doc.get("trades")
    if isinstance(trades, list):
        return len(trades) > 0
    quantity, remaining = doc.get("quantity"), doc.get("remaining_quantity")
    if isinstance(quantity, int) and isinstance(remaining, int):
        return remaining < quantity
    return doc.get("status") in ("filled", "partially_filled")


def _order_id(doc: dict[str, Any]) -> str | None:
    value = doc.get("order_id", doc.get("id"))
    return None if value is None else str(value)


class _Sender:
    def __init__(self, cfg: WorkerConfig, pool: Pool, result: WorkerResult) -> None:
        self.cfg = cfg
        self.pool = pool
        self.result = result
        self.ids: dict[int, str] = dict(cfg.placed_before)  # schedule order number -> order id
        self.known: dict[int, list[str]] = defaultdict(list)  # broker -> its order ids (recent)
        self.unanswered: dict[int, asyncio.Future[None]] = {}
        """Order numbers of the new orders sent and not answered yet: a cancel of one waits for its answer."""
        for broker, ids in cfg.known_before.items():
            self.known[broker].extend(ids[-MAX_KNOWN_ORDERS_PER_BROKER:])
        self.rng = random.Random(cfg.seed * 1_000 + cfg.index)
        self.symbols = cfg.model.symbols
        self.wall_offset = time.time() - time.monotonic()
        """Added to a monotonic instant: the wall-clock time (epoch s) the database's timestamps are compared with."""

    def _record(self, kind: int, status: int | str, latency_ms: float) -> None:
        """Every answer's latency counts, errors and timeouts too (a timeout at the time it was given up): an
        overloaded server's tail is its failures, which a percentile of the successes alone would hide."""
        endpoint = m.KIND_ENDPOINT[kind]
        self.result.statuses[endpoint][str(status)] += 1
        self.result.latencies_ms[endpoint].append(latency_ms)

    def _request_for(self, event: m.Event) -> tuple[str, str, bytes | None] | None:
        kind = event.kind
        if kind == m.ORDER:
            return "POST", "/orders", order_body(self.cfg.model, event)
        if kind == m.CANCEL:
            oid = self.ids.get(event.order_no)
            return None if oid is None else ("POST", f"/orders/{oid}/cancel", None)
        if kind == m.GET_ORDER:
            known = self.known.get(event.broker)
            return None if not known else ("GET", f"/orders/{self.rng.choice(known)}", None)
        if kind == m.PRICE:
            return "GET", f"/stocks/{self.symbols[event.symbol]}/price", None
        if kind == m.BOOK:
            return "GET", f"/stocks/{self.symbols[event.symbol]}/book", None
        return "GET", "/balance", None

    def _on_order(self, event: m.Event, data: bytes, latency_ms: float, scheduled: float) -> None:
        self.result.orders_accepted += 1
        try:
            doc = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return
        if not isinstance(doc, dict):
            return
        oid = _order_id(doc)
        if oid is not None:
            sent = scheduled + self.wall_offset
            self.result.order_times.append((oid, sent, sent + latency_ms / 1000.0))
            if event.order_class == m.MARKET:
                self.result.market_orders.append((oid, sent))
            if event.order_no >= 0:
                self.ids[event.order_no] = oid
            known = self.known[event.broker]
            known.append(oid)
            if len(known) > MAX_KNOWN_ORDERS_PER_BROKER:
                del known[: len(known) // 2]
        self.result.order_states[str(doc.get("status"))] += 1
        if _has_fill(doc):
            self.result.order_to_fill_ms.append(latency_ms)

    async def send(self, event: m.Event, scheduled: float) -> None:
        """Send ``event`` now; latency counts from ``scheduled`` (a monotonic instant). The schedule lag counts from
        when the request could be sent up to the moment it is written (a wait for one of the worker's own
        connections is the generator's delay, not the server's): from ``scheduled``, or, for a cancel whose order
        was not answered by then, from that answer (a broker cannot cancel an order before it knows its id; that
        wait is the server's and counts in the cancel's latency)."""
        if event.kind == m.ORDER and event.order_no >= 0:
            answered = asyncio.get_running_loop().create_future()
            self.unanswered.setdefault(event.order_no, answered)  # a schedule numbers each order once
            try:
                await self._send(event, scheduled, scheduled)
            finally:
                if self.unanswered.get(event.order_no) is answered:
                    del self.unanswered[event.order_no]
                answered.set_result(None)
            return
        ready = scheduled
        waiting = self.unanswered.get(event.order_no) if event.kind == m.CANCEL else None
        if waiting is not None:
            self.result.waited_for_order += 1
            left = scheduled + self.cfg.timeout_s - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiting), max(0.0, left))
            ready = time.monotonic()
        await self._send(event, scheduled, ready)

    async def _send(self, event: m.Event, scheduled: float, ready: float) -> None:
        request = self._request_for(event)
        if request is None:  # its order failed or timed out (an error of its own), or no order of the broker known
            self.result.skipped[m.KIND_ENDPOINT[event.kind]] += 1
            return
        method, path, body = request
        lags = self.result.lags_ms
        written = False

        def on_write() -> None:
            nonlocal written
            written = True
            lags.append((time.monotonic() - ready) * 1000.0)

        status: int | str
        data = b""
        try:
            status, data = await self.pool.request(
                method,
                path,
                auth=self.cfg.auth[event.broker],
                body=body,
                retry=event.kind != m.ORDER,
                on_write=on_write,
                # What is left of the timeout counted from the schedule (a cancel may have waited for its order's
                # answer): no request outlives its schedule by more than the timeout, which the run's end waits for.
                timeout_s=max(0.0, scheduled + self.cfg.timeout_s - time.monotonic()),
            )
        except TimeoutError:
            status = "timeout"
        except HttpError:
            status = "connection_error"
        latency_ms = (time.monotonic() - scheduled) * 1000.0
        if not written:
            lags.append((time.monotonic() - ready) * 1000.0)  # never written: it was that late when it was given up
        self._record(event.kind, status, latency_ms)
        if event.kind == m.ORDER and isinstance(status, int) and 200 <= status < 300:
            self._on_order(event, data, latency_ms, scheduled)


async def _open_loop(cfg: WorkerConfig, result: WorkerResult) -> None:
    pool = Pool(cfg.base_url, timeout_s=cfg.timeout_s, max_connections=cfg.max_connections)
    await pool.warm(cfg.warm_connections)
    sender = _Sender(cfg, pool, result)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    now = time.monotonic
    for event in cfg.events:
        scheduled = cfg.t0 + event.t
        delay = scheduled - now()
        if delay > 0:
            await asyncio.sleep(delay)
            # uvloop's timers have millisecond granularity: about a fifth of the sleeps end up to ~1.3 ms early.
            # The rest of the way by yielding to the loop (answers keep being read meanwhile): never early.
            while now() < scheduled:
                await asyncio.sleep(0)
        task = loop.create_task(sender.send(event, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    remaining = max(0.0, cfg.t0 + cfg.duration_s - now())
    await asyncio.sleep(remaining)
    if tasks:
        await asyncio.wait(tasks, timeout=cfg.timeout_s + 2.0)
    result.elapsed_s = now() - cfg.t0
    result.peak_connections = pool.peak_open
    result.connections_opened = pool.opened
    result.waited_for_connection = pool.waited
    pool.close()


async def _closed_loop(cfg: WorkerConfig, result: WorkerResult) -> None:
    pool = Pool(cfg.base_url, timeout_s=cfg.timeout_s, max_connections=max(1, cfg.closed_loop_clients))
    await pool.warm(cfg.closed_loop_clients)
    sender = _Sender(cfg, pool, result)
    model = cfg.model
    delay = cfg.t0 - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    end = cfg.t0 + cfg.duration_s
    zipf = m.Zipf(len(model.symbols), m.ZIPF_S, random.Random(cfg.seed ^ 0x21FF))

    async def client(n: int) -> None:
        rng = random.Random(cfg.seed * 7919 + cfg.index * 1000 + n)
        while time.monotonic() < end:
            broker = rng.choice(cfg.brokers)
            symbol = zipf.draw(rng)
            order_class = m.pick(m.ORDER_MIX, rng)
            side, price, quantity = m.order_fields(model, symbol, order_class, rng)
            event = m.Event(0.0, m.ORDER, broker, -1, symbol, side, order_class, price, quantity)
            await sender.send(event, time.monotonic())

    await asyncio.gather(*(client(n) for n in range(cfg.closed_loop_clients)))
    result.elapsed_s = time.monotonic() - cfg.t0
    result.lags_ms.clear()  # no schedule in a closed loop
    result.peak_connections = pool.peak_open
    result.connections_opened = pool.opened
    pool.close()


def run_worker(cfg: WorkerConfig) -> WorkerResult:
    """Body of a worker process (also callable in-process)."""
    install_uvloop()
    result = WorkerResult(index=cfg.index)
    started_cpu = time.process_time()
    if cfg.closed_loop_clients > 0:
        asyncio.run(_closed_loop(cfg, result))
    else:
        asyncio.run(_open_loop(cfg, result))
    result.cpu_s = time.process_time() - started_cpu
    return result.plain()


def worker_main(cfg: WorkerConfig, queue: Any) -> None:
    """multiprocessing target: run and put the result (or the exception text) on ``queue``. The schedule and the
    modules exist by now and stay to the end: settled (``exchange.heap``), a full collection of them cannot stall
    the sends behind their schedule."""
    try:
        priority = raise_priority(cfg.nice)
        settle()
        result = run_worker(cfg)
        result.priority = priority
        queue.put(result)
    except BaseException as exc:
        queue.put(f"worker {cfg.index} failed: {exc.__class__.__name__}: {exc}")
        raise
