"""What the cyclic garbage collector costs a matcher holding big books, with and without ``exchange.heap.Keeper``
(not a test; numbers are printed, never asserted).

    uv run python -m ops.bench_heap [--resting 100000 500000 1000000] [--symbols 450] [--growth 700] [--repeat 3]

For each ``--resting`` total, the books of ``--symbols`` symbols are built as the matcher caches them (an
``OrderBook`` rebuilt from resting orders whose ids are distinct ``UUID`` objects, as read from PostgreSQL, plus the
owners map of ``CachedBook``). Timed, best of ``--repeat``:

* **full collection, not kept**: ``gc.collect()`` over the books, what the collector does on its own each time the
  oldest generation has grown by a quarter (CPython 3.11's rule), with the matcher standing still;
* **keep of one second's growth**: after a keep, ``--growth`` more resting orders (``--scale 100`` adds ~570 a
  second), then the next keep (its full collection and the freeze): what the matcher pays at most once a second;
* **full collection, kept**: ``gc.collect()`` right after a keep.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable
from uuid import UUID

from exchange.engine import OrderBook, OrderSpec, OrderType, Place, RestingOrder, Side, TimeInForce
from exchange.heap import Keeper
from exchange.matching.service import CachedBook


def _resting(rng: random.Random, brokers: list[int], priority: int) -> RestingOrder:
    side = Side.BID if priority % 2 else Side.ASK
    price = rng.randint(9_000, 9_999) if side is Side.BID else rng.randint(10_001, 11_000)
    return RestingOrder(
        order_id=UUID(int=rng.getrandbits(128)),
        broker_id=UUID(int=rng.choice(brokers)),  # one object per row, as psycopg returns them
        document_number="12345678901",
        side=side,
        price=price,
        quantity=100,
        remaining=100,
        priority=priority,
    )


def _books(rng: random.Random, total: int, symbols: int) -> dict[str, CachedBook]:
    brokers = [rng.getrandbits(128) for _ in range(100)]
    books: dict[str, CachedBook] = {}
    per_symbol = max(1, total // symbols)
    for s in range(symbols):
        resting = [_resting(rng, brokers, s * per_symbol + i) for i in range(per_symbol)]
        owners = {o.order_id: (o.broker_id, o.side) for o in resting}
        books[f"S{s}"] = CachedBook(0, OrderBook.rebuild(f"S{s}", resting), owners)
    return books


def _grow(rng: random.Random, books: dict[str, CachedBook], n: int, first_seq: int) -> None:
    """``n`` more passive orders placed through the engine, as the matcher's batches rest them."""
    brokers = [rng.getrandbits(128) for _ in range(100)]
    symbols = list(books)
    for i in range(n):
        symbol = rng.choice(symbols)
        o = _resting(rng, brokers, first_seq + i)
        spec = OrderSpec(
            o.order_id, o.broker_id, o.document_number, symbol, o.side, OrderType.LIMIT, TimeInForce.GTC, o.price, 100
        )
        cached = books[symbol]
        cached.book.apply(Place(first_seq + i, spec), 0)
        cached.owners[o.order_id] = (o.broker_id, o.side)


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def measure(total: int, symbols: int, growth: int, seed: int) -> tuple[int, float, float, float]:
    rng = random.Random(seed)  # noqa: S311  # reproducible made-up orders, not secrets
    books = _books(rng, total, symbols)
    gc.collect()
    tracked = len(gc.get_objects())
    not_kept = _timed(gc.collect)
    keeper = Keeper(every_s=0.0)
    keeper()
    _grow(rng, books, growth, total + 1)
    keep = _timed(keeper)
    kept = _timed(gc.collect)
    gc.unfreeze()
    del books
    gc.collect()
    return tracked, not_kept, keep, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resting", type=int, nargs="+", default=[100_000, 500_000, 1_000_000])
    parser.add_argument("--symbols", type=int, default=450)
    parser.add_argument("--growth", type=int, default=700, help="resting orders added between two keeps")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        "resting orders · tracked objects · full collection, not kept · keep of one second's growth"
        " · full collection, kept"
    )
    for total in args.resting:
        runs = [measure(total, args.symbols, args.growth, args.seed + r) for r in range(args.repeat)]
        tracked = runs[0][0]
        not_kept, keep, kept = (min(run[i] for run in runs) for i in (1, 2, 3))
        print(f"{total:>14,} · {tracked:>15,} · {not_kept:>21.1f} ms · {keep:>25.2f} ms · {kept:>17.2f} ms", flush=True)


if __name__ == "__main__":
    main()
