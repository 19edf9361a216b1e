"""Throughput benchmark of the matching engine (not a test; numbers are printed, never asserted).

    uv run python -m ops.bench_engine [--orders 10000] [--commands 200000] [--rebuild 100000] [--seed 1]
        [--repeat 5]

Mix per new order: 75% passive limits, 20% crossing limits, 5% market IOC; plus a cancel of a random live order
after 35% of new orders. All commands are generated up front (on a scratch book, so cancels target orders that
are really live); only ``OrderBook.apply`` on a fresh copy of the starting book is timed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from uuid import UUID

from exchange.engine import (
    Cancel,
    Closed,
    Command,
    OrderBook,
    OrderSpec,
    OrderType,
    Place,
    Rested,
    RestingOrder,
    Side,
    TimeInForce,
)

SYMBOL = "BENCH"
MID = 10_000
T0 = 1_700_000_000_000_000
TAKER_MAX_QTY = 300


class LiveSet:
    """Live order ids with O(1) add, remove and uniform random pick."""

    def __init__(self) -> None:
        self.items: list[UUID] = []
        self.index: dict[UUID, int] = {}

    def add(self, item: UUID) -> None:
        self.index[item] = len(self.items)
        self.items.append(item)

    def discard(self, item: UUID) -> None:
        i = self.index.pop(item, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.index[last] = i

    def pick(self, rnd: random.Random) -> UUID:
        return self.items[rnd.randrange(len(self.items))]

    def __len__(self) -> int:
        return len(self.items)


class Generator:
    def __init__(self, rnd: random.Random, brokers: int = 50) -> None:
        self.rnd = rnd
        self.brokers = [UUID(int=rnd.getrandbits(128)) for _ in range(brokers)]
        self.next_id = 1

    def order(self, side: Side, order_type: OrderType, price: int | None, quantity: int, tif: TimeInForce) -> OrderSpec:
        self.next_id += 1
        return OrderSpec(
            order_id=UUID(int=self.next_id),
            broker_id=self.rnd.choice(self.brokers),
            document_number=str(self.rnd.randrange(1000)),
            symbol=SYMBOL,
            side=side,
            order_type=order_type,
            time_in_force=tif,
            price=price,
            quantity=quantity,
        )

    def passive(self, side: Side, book: OrderBook) -> OrderSpec:
        """A limit 1..50 ticks behind the current touch, so it rests."""
        offset = self.rnd.randint(0, 49)
        best_bid, best_ask = book.best_bid(), book.best_ask()
        if side is Side.BID:
            price = (MID if best_ask is None else best_ask) - 1 - offset
        else:
            price = (MID if best_bid is None else best_bid) + 1 + offset
        return self.order(side, OrderType.LIMIT, price, self.rnd.randint(1, 100), TimeInForce.GTC)

    def crossing(self, side: Side, book: OrderBook) -> OrderSpec:
        """A GTC limit 0..5 ticks through the opposite touch; takers are larger than passive orders on average,
        which keeps the book size roughly stable under this mix."""
        through = self.rnd.randint(0, 5)
        best = book.best_ask() if side is Side.BID else book.best_bid()
        price = (best or MID) + through if side is Side.BID else (best or MID) - through
        return self.order(side, OrderType.LIMIT, price, self.rnd.randint(1, TAKER_MAX_QTY), TimeInForce.GTC)

    def market(self, side: Side) -> OrderSpec:
        return self.order(side, OrderType.MARKET, None, self.rnd.randint(1, TAKER_MAX_QTY), TimeInForce.IOC)


def track(live: LiveSet, events: Sequence[object]) -> None:
    for e in events:
        if isinstance(e, Rested):
            live.add(e.order_id)
        elif isinstance(e, Closed):
            live.discard(e.order_id)


def generate(args: argparse.Namespace) -> tuple[list[RestingOrder], list[tuple[Command, int]]]:
    rnd = random.Random(args.seed)  # noqa: S311 - reproducible load, not security
    gen = Generator(rnd)
    scratch = OrderBook(SYMBOL)
    live = LiveSet()
    seq = 0
    now = T0
    while len(scratch) < args.orders:
        seq += 1
        track(live, scratch.apply(Place(seq, gen.passive(rnd.choice((Side.BID, Side.ASK)), scratch)), now))
    start = scratch.resting_orders()
    commands: list[tuple[Command, int]] = []
    while len(commands) < args.commands:
        seq += 1
        now += rnd.randint(0, 50)
        side = rnd.choice((Side.BID, Side.ASK))
        kind = rnd.random()
        if kind < 0.75:
            spec = gen.passive(side, scratch)
        elif kind < 0.95:
            spec = gen.crossing(side, scratch)
        else:
            spec = gen.market(side)
        command: Command = Place(seq, spec)
        commands.append((command, now))
        track(live, scratch.apply(command, now))
        if rnd.random() < 0.35 and live and len(commands) < args.commands:
            seq += 1
            command = Cancel(seq, live.pick(rnd))
            commands.append((command, now))
            track(live, scratch.apply(command, now))
    print(f"book after the run: {len(scratch)} orders, best {scratch.best_bid()}/{scratch.best_ask()}")
    return start, commands


def rebuild_input(n: int, seed: int) -> list[RestingOrder]:
    """``n`` resting orders in canonical (priority) order on a non-crossed book, ~200 levels."""
    rnd = random.Random(seed)  # noqa: S311 - reproducible load, not security
    broker = UUID(int=7)
    orders: list[RestingOrder] = []
    for i in range(n):
        side = Side.BID if i % 2 else Side.ASK
        price = MID - rnd.randint(1, 100) if side is Side.BID else MID + rnd.randint(1, 100)
        quantity = rnd.randint(1, 100)
        orders.append(RestingOrder(UUID(int=i + 1), broker, str(i % 1000), side, price, quantity, quantity, i + 1))
    return orders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=10_000, help="resting orders before the timed run")
    parser.add_argument("--commands", type=int, default=200_000, help="commands in the timed run")
    parser.add_argument("--rebuild", type=int, default=100_000, help="size of the book to rebuild")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (best and median are printed)")
    args = parser.parse_args()

    start, commands = generate(args)
    times: list[float] = []
    events = 0
    for _ in range(args.repeat):  # fresh book each round; best and median because the host may be shared
        book = OrderBook.rebuild(SYMBOL, start)
        apply = book.apply
        events = 0
        t = time.perf_counter()
        for command, now in commands:
            events += len(apply(command, now))
        times.append(time.perf_counter() - t)
    best, median = min(times), statistics.median(times)
    print(
        f"apply: {len(commands)} commands ({events} events) on a {len(start)}-order book, {args.repeat} rounds:"
        f" best {best:.3f} s = {len(commands) / best:,.0f} commands/s,"
        f" median {median:.3f} s = {len(commands) / median:,.0f} commands/s"
    )

    resting = rebuild_input(args.rebuild, args.seed)
    rebuild_times: list[float] = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        rebuilt = OrderBook.rebuild(SYMBOL, resting)
        rebuild_times.append(time.perf_counter() - t)
    print(
        f"rebuild: {len(rebuilt)} orders: best {min(rebuild_times):.3f} s,"
        f" median {statistics.median(rebuild_times):.3f} s"
    )
    t = time.perf_counter()
    digest = rebuilt.state_hash()
    print(f"state_hash of the rebuilt book: {time.perf_counter() - t:.3f} s ({digest[:12]}...)")


if __name__ == "__main__":
    main()
