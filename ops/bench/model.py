# ruff: noqa: S311  (seeded pseudo-random traffic, not cryptography)
"""The traffic model (B3-like) and its precomputed Poisson schedule.

At ``scale = 100`` (percent): 450 symbols, 100 brokers, Zipf(0.95) symbol popularity, 700 new orders/s (75 %
passive limits, 20 % limits priced to cross, 5 % market), cancels of 35 % of the new orders (40 % of them after
0.5-5 s, 35 % after 5-60 s, 25 % after 1-10 min), and
reads making up 28 % of all requests (35 % order status, 30 % price, 25 % book, 10 % balance). Above 100 % only
the rates grow; below it the broker and symbol counts shrink with the rates (not below a small floor), so the
per-symbol activity stays B3-like.

The schedule is computed up front from ``seed`` (the same seed gives the same schedule), in seconds from the
start of the measured run, and is the market's steady state: the orders of the 10 minutes before the run whose
cancels fall inside it are in it too, at negative times (:func:`pre_run`: placed during the setup, not measured),
so that cancels are 35 % of the new orders in a run of any length (a 20-s run of the orders alone had 13 %: most
cancels come minutes after their order). A cancel that would fall after the run's end is dropped. Each event names
the broker that sends it, and :func:`partition` gives every broker's events to one sender process, so a cancel or
status read can use the ids that process's own orders received (those placed before the run are handed to it).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

T = TypeVar("T")

# Event kinds
ORDER, CANCEL, GET_ORDER, PRICE, BOOK, BALANCE = range(6)
KIND_ENDPOINT = {
    ORDER: "POST /orders",
    CANCEL: "POST /orders/{id}/cancel",
    GET_ORDER: "GET /orders/{id}",
    PRICE: "GET /stocks/{symbol}/price",
    BOOK: "GET /stocks/{symbol}/book",
    BALANCE: "GET /balance",
}

# Order classes
PASSIVE, CROSSING, MARKET = range(3)
CLASS_NAMES = ("passive", "crossing", "market")

BID, ASK = 0, 1
SIDE_NAMES = ("bid", "ask")

# The model's facts at 100 %
BASE_SYMBOLS = 450
BASE_BROKERS = 100
ZIPF_S = 0.95
BASE_ORDERS_PER_S = 700.0
ORDER_MIX = ((PASSIVE, 0.75), (CROSSING, 0.20), (MARKET, 0.05))
CANCEL_FRACTION = 0.35  # of new orders
CANCEL_DELAYS = (((0.5, 5.0), 0.40), ((5.0, 60.0), 0.35), ((60.0, 600.0), 0.25))  # ((low s, high s), weight)
READ_SHARE = 0.28  # of all requests
READ_MIX = ((GET_ORDER, 0.35), (PRICE, 0.30), (BOOK, 0.25), (BALANCE, 0.10))

MIN_SYMBOLS = 5
MIN_BROKERS = 2
PASSIVE_TICKS = 20  # passive limits rest 1..20 cents away from the reference price
CROSS_TICKS = 5  # crossing limits reach 1..5 cents past the reference price


class Event(NamedTuple):
    """One request of the schedule. ``t``: seconds after the run's start. ``order_no``: for ORDER the order's
    number in the schedule, for CANCEL the number of the order to cancel; -1 otherwise."""

    t: float
    kind: int
    broker: int
    order_no: int = -1
    symbol: int = -1
    side: int = 0
    order_class: int = PASSIVE
    price: int = 0
    quantity: int = 0


@dataclass(frozen=True)
class Model:
    scale: float
    symbols: list[str]
    ref_prices: list[int]
    brokers: int
    orders_per_s: float
    cancels_per_s: float  # nominal: before dropping cancels that fall after the run's end
    reads_per_s: float

    @property
    def requests_per_s(self) -> float:
        return self.orders_per_s + self.cancels_per_s + self.reads_per_s


def symbol_prefix(rng: random.Random) -> str:
    """A fresh 4-letter prefix, so the books of one run never mix with the leftovers of an earlier one."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(4))


def build_model(scale: float, seed: int, prefix: str) -> Model:
    if scale <= 0:
        raise ValueError("scale must be > 0")
    rng = random.Random(seed)
    shrink = min(1.0, scale / 100.0)
    n_symbols = max(MIN_SYMBOLS, round(BASE_SYMBOLS * shrink))
    n_brokers = max(MIN_BROKERS, round(BASE_BROKERS * shrink))
    symbols = [f"{prefix}{i:03d}" for i in range(n_symbols)]
    # Log-uniform reference prices between R$ 5 and R$ 200, in cents.
    refs = [round(math.exp(rng.uniform(math.log(500), math.log(20_000)))) for _ in symbols]
    orders = BASE_ORDERS_PER_S * scale / 100.0
    cancels = orders * CANCEL_FRACTION
    reads = (orders + cancels) * READ_SHARE / (1.0 - READ_SHARE)
    return Model(scale, symbols, refs, n_brokers, orders, cancels, reads)


class Zipf:
    """Zipf(s) over ``n`` items, ranks shuffled so the popular symbols spread over the matching partitions."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        weights = [1.0 / (k**s) for k in range(1, n + 1)]
        self.cum = list(itertools.accumulate(weights))
        self.order = list(range(n))
        rng.shuffle(self.order)

    def draw(self, rng: random.Random) -> int:
        rank = bisect.bisect_left(self.cum, rng.random() * self.cum[-1])
        return self.order[min(rank, len(self.order) - 1)]


def pick(mix: Sequence[tuple[T, float]], rng: random.Random) -> T:
    """A value of ``mix`` ((value, weight), …; weights summing to 1) drawn with one ``rng.random()``."""
    x = rng.random()
    for value, weight in mix:
        if x < weight:
            return value
        x -= weight
    return mix[-1][0]


def _cancel_delay(rng: random.Random) -> float:
    low, high = pick(CANCEL_DELAYS, rng)
    return rng.uniform(low, high)


def order_fields(model: Model, symbol: int, order_class: int, rng: random.Random) -> tuple[int, int, int]:
    """(side, price, quantity) of a new order of ``order_class`` on ``symbol``; price 0 for market orders."""
    side = rng.randrange(2)
    ref = model.ref_prices[symbol]
    quantity = 100 * rng.randint(1, 10)
    if order_class == MARKET:
        return side, 0, quantity
    if order_class == PASSIVE:
        offset = rng.randint(1, PASSIVE_TICKS)
        price = ref - offset if side == BID else ref + offset
    else:  # crossing: past the reference price, into the other side's passive levels
        offset = rng.randint(1, CROSS_TICKS)
        price = ref + offset if side == BID else ref - offset
    return side, max(1, price), quantity


def _poisson_times(rate: float, duration: float, rng: random.Random) -> list[float]:
    times: list[float] = []
    if rate <= 0:
        return times
    t = rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


WARM_UP_S = max(high for (_, high), _ in CANCEL_DELAYS)
"""How far before the run the steady state's orders go: the longest delay of a cancel."""


def build_schedule(model: Model, duration: float, seed: int) -> list[Event]:
    """Every request of an open-loop run of ``duration`` seconds, sorted by time: first the orders placed before the
    run that it sees cancelled (negative times, see the module's doc), then the run's own."""
    rng = random.Random(seed ^ 0x5EED)
    zipf = Zipf(len(model.symbols), ZIPF_S, random.Random(seed ^ 0x21FF))
    # Cancels target limit orders only (a market order never rests); this probability makes them 35 % of all.
    limit_share = sum(w for c, w in ORDER_MIX if c != MARKET)
    p_cancel = CANCEL_FRACTION / limit_share
    events = _cancelled_before(model, duration, seed, zipf, p_cancel)
    for order_no, t in enumerate(_poisson_times(model.orders_per_s, duration, rng)):
        broker = rng.randrange(model.brokers)
        symbol = zipf.draw(rng)
        order_class = pick(ORDER_MIX, rng)
        side, price, quantity = order_fields(model, symbol, order_class, rng)
        events.append(Event(t, ORDER, broker, order_no, symbol, side, order_class, price, quantity))
        if order_class != MARKET and rng.random() < p_cancel:
            at = t + _cancel_delay(rng)
            if at < duration:
                events.append(Event(at, CANCEL, broker, order_no, symbol))
    for t in _poisson_times(model.reads_per_s, duration, rng):
        kind = pick(READ_MIX, rng)
        events.append(Event(t, kind, rng.randrange(model.brokers), -1, zipf.draw(rng)))
    events.sort(key=lambda e: e.t)
    return events


def _cancelled_before(model: Model, duration: float, seed: int, zipf: Zipf, p_cancel: float) -> list[Event]:
    """The orders of the :data:`WARM_UP_S` before the run whose cancels fall inside it, and those cancels; numbered
    below 0 (the run's orders count from 0). Drawn from a stream of their own, so the run's own orders and reads are
    those of the same seed without it; each order's other fields are only drawn once its cancel is known to fall in
    the run (most do not)."""
    rng = random.Random(seed ^ 0xCA9CE1)
    events: list[Event] = []
    for n, t in enumerate(_poisson_times(model.orders_per_s, WARM_UP_S, rng), start=1):
        order_class = pick(ORDER_MIX, rng)
        if order_class == MARKET or rng.random() >= p_cancel:
            continue
        at = t - WARM_UP_S + _cancel_delay(rng)
        if not 0 <= at < duration:
            continue
        broker, symbol = rng.randrange(model.brokers), zipf.draw(rng)
        side, price, quantity = order_fields(model, symbol, order_class, rng)
        events.append(Event(t - WARM_UP_S, ORDER, broker, -1 - n, symbol, side, order_class, price, quantity))
        events.append(Event(at, CANCEL, broker, -1 - n, symbol))
    return events


def pre_run(schedule: list[Event]) -> tuple[list[Event], list[Event]]:
    """``schedule`` split into the orders to place before the run (the setup's, not measured) and the run's events."""
    return [e for e in schedule if e.t < 0], [e for e in schedule if e.t >= 0]


def prefill_orders(model: Model, per_side: int, seed: int) -> list[Event]:
    """Passive orders to seed every book with ``per_side`` levels a side before the run (setup, not measured)."""
    rng = random.Random(seed ^ 0xB00C)
    out: list[Event] = []
    for symbol, ref in enumerate(model.ref_prices):
        for level in range(1, per_side + 1):
            for side in (BID, ASK):
                price = ref - level if side == BID else ref + level
                quantity = 100 * rng.randint(1, 10)
                out.append(Event(0.0, ORDER, rng.randrange(model.brokers), -1, symbol, side, PASSIVE, price, quantity))
    return out


def partition(events: list[Event], workers: int) -> list[list[Event]]:
    """Split by broker: broker ``b`` is sent by worker ``b % workers`` (keeps each list sorted)."""
    parts: list[list[Event]] = [[] for _ in range(workers)]
    for event in events:
        parts[event.broker % workers].append(event)
    return parts
