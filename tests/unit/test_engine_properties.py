"""Property tests: the fast engine against the naive reference, plus the book invariants, on random sequences.

Sequences are built so that the interesting paths actually run (measured when they were widened: books of 5-30
orders instead of under 5, most cancels and amends reaching a live order, every STP mode firing):
places are mostly valid GTC/GTD limits on two price bands that touch at 100, so books build up on both sides,
with aggressive limits that sweep levels, market orders, IOC/FOK (with and without ``valid_until``) and some
invalid inputs; cancels and amends mostly name an order that is resting at that point (else a closed or unknown
id); places sometimes reuse a live (duplicate) or closed id; a third of the sequences come from one single
client (one broker, one document number), so every cross is a self-cross and every STP mode fires; the clock
moves forward and ``ExpireDue`` sweeps (all due orders, or a limited number of them). The rebuild switch falls
anywhere in the sequence, and late commits move commands by up to ``LATE_WINDOW`` positions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from exchange.engine import (
    MAX_TAKER_MATCHES,
    Accepted,
    Amend,
    Amended,
    Cancel,
    Closed,
    CloseReason,
    Command,
    Decremented,
    Event,
    ExpireDue,
    Fill,
    OrderBook,
    OrderSpec,
    OrderType,
    Place,
    Rested,
    RestingOrder,
    Side,
    StpMode,
    TimeInForce,
    hash_resting,
)
from exchange.engine.reference import ReferenceBook
from tests.unit.support import SYMBOL, T0, oid

BROKERS = [UUID(int=0xA), UUID(int=0xB), UUID(int=0xC)]
LIMIT_TIFS = [TimeInForce.GTC] * 3 + [TimeInForce.GTD] * 2 + [TimeInForce.IOC, TimeInForce.FOK]
MARKET_TIFS = [TimeInForce.IOC] * 2 + [TimeInForce.FOK] * 2 + [TimeInForce.GTC]
# Passive limits rest on two price bands that only touch at 100, so books build up on both sides; aggressive
# limits reach into the other side's band and sweep it.
REST_BANDS = {Side.BID: range(95, 101), Side.ASK: range(100, 106)}
CROSS_BANDS = {Side.BID: range(100, 107), Side.ASK: range(94, 101)}
GTD_OFFSETS = [-1, 0, *range(1, 13), 20, 30, 40, 60, 80, 120]
"""``valid_until - now`` of a GTD order: mostly alive for a few commands, some already expired, some long-lived."""
IOC_OFFSETS: list[int | None] = [None] * 6 + [-1, 0, 1, 5]
"""An IOC/FOK may carry a ``valid_until``; at or before ``now`` it expires untraded."""
LATE_WINDOW = 8
"""How far (in commands) a late-committed command may be applied after its seq's turn."""

T = TypeVar("T")


class Pick(Protocol):
    """One choice among ``options``: a drawn index for Hypothesis (:func:`_ops`), ``Random.choice`` for the long
    seeded sequences, so both generate the same shapes from one definition (:func:`make_op`)."""

    def __call__(self, options: Sequence[T], /) -> T: ...


@dataclass(frozen=True)
class Clients:
    """Who sends a sequence's orders. "Self" is the same broker *and* document number (self-trade prevention)."""

    brokers: tuple[UUID, ...]
    documents: tuple[str, ...]
    stp_modes: tuple[StpMode, ...]


MIXED = Clients(tuple(BROKERS), ("d1", "d2"), (StpMode.NONE, StpMode.NONE, *StpMode))
ONE_CLIENT = Clients((BROKERS[0],), ("d1",), (StpMode.NONE, *StpMode))
"""STP-heavy: every cross is a self-cross, so every STP mode (and FOK feasibility with self liquidity) fires."""
POPULATIONS = [MIXED, MIXED, ONE_CLIENT]


@dataclass(frozen=True)
class PlaceOp:
    order: OrderSpec
    """``order_id`` is a placeholder; ``valid_until`` is an offset from the command's ``now``."""
    reuse: int | None
    """None: a fresh id; k: the id of the k-th most recently placed order (live: duplicate; closed: reuse)."""


@dataclass(frozen=True)
class Target:
    """The order a cancel or amend names, resolved when the sequence is built: ``resting``: the k-th (modulo)
    order resting at that point; ``placed``: the k-th (modulo) most recently placed id, live or closed;
    ``unknown``: an id never placed. ``resting`` and ``placed`` fall back to the next pool when theirs is empty."""

    pool: str
    k: int


@dataclass(frozen=True)
class CancelOp:
    target: Target


@dataclass(frozen=True)
class AmendOp:
    target: Target
    quantity: int | None
    """Change of the target's total quantity (None: unchanged); large negative values make it invalid."""
    price: int | None
    """Change of the target's price (None: unchanged); large negative values make it invalid."""


@dataclass(frozen=True)
class ExpireOp:
    limit: int | None = None
    """At most this many due orders closed (None: all of them)."""


Op = PlaceOp | CancelOp | AmendOp | ExpireOp
TARGET_POOLS = ["resting"] * 15 + ["placed"] * 3 + ["unknown"] * 2
REUSE: list[int | None] = [None] * 60 + [0, 1, 2, 3, 5]
EXPIRE_LIMITS: list[int | None] = [None] * 3 + [0, 1, 2]
OP_KINDS = ["place"] * 14 + ["amend"] * 4 + ["cancel"] * 2 + ["expire"]
LONG_OP_KINDS = ["place"] * 14 + ["amend"] * 4 + ["cancel"] * 4 + ["expire"] * 2
"""Long sequences cancel more, so their books level off (a few dozen orders) instead of growing all along."""
PLACE_STYLES = ["rest"] * 14 + ["cross"] * 3 + ["market"] * 1 + ["odd"] * 2
AMEND_QUANTITY: list[int | None] = [None, None, -3, -2, -1, -1, 0, 1, 2, 4, -100]
AMEND_PRICE: list[int | None] = [None, None, None, *range(-6, 0), *range(1, 7), -1000]


def make_place(pick: Pick, clients: Clients) -> PlaceOp:
    """Mostly valid GTC/GTD limits on the passive bands (books build up), then aggressive limits, market orders
    and ``odd`` ones: any mix of valid and invalid fields (wrong symbol, bad price/quantity/TIF)."""
    style = pick(PLACE_STYLES)
    side = pick([Side.BID, Side.ASK])
    order_type = OrderType.MARKET if style == "market" else OrderType.LIMIT
    valid_until: int | None
    price: int | None
    quantity: int
    symbol = SYMBOL
    if style == "rest":
        tif = pick([TimeInForce.GTC, TimeInForce.GTC, TimeInForce.GTD])
        price = pick(REST_BANDS[side])
        quantity = pick(range(1, 11))
        valid_until = pick(GTD_OFFSETS) if tif is TimeInForce.GTD else None
    elif style in ("cross", "market"):
        if style == "cross":
            tif = pick(LIMIT_TIFS)
            price = pick(CROSS_BANDS[side])
        else:
            tif = pick([TimeInForce.IOC, TimeInForce.FOK])
            price = None
        quantity = pick(range(1, 9))
        if tif is TimeInForce.GTD:
            valid_until = pick(GTD_OFFSETS)
        else:
            valid_until = pick(IOC_OFFSETS) if tif in (TimeInForce.IOC, TimeInForce.FOK) else None
    else:
        order_type = pick([OrderType.LIMIT] * 6 + [OrderType.MARKET])
        if order_type is OrderType.MARKET:
            tif = pick(MARKET_TIFS)
            price = pick([None] * 10 + [100])  # a priced market order is invalid
        else:
            tif = pick(LIMIT_TIFS)
            price = pick([*range(95, 106)] * 5 + [0, -5, None])
        if tif is TimeInForce.GTD:
            valid_until = pick([None, *range(-2, 10)])
        elif tif in (TimeInForce.IOC, TimeInForce.FOK):
            valid_until = pick(IOC_OFFSETS)
        else:  # a GTC with one is invalid
            valid_until = pick([None] * 20 + [5])
        quantity = pick([0, -1, *range(1, 11), *range(1, 11), *range(1, 11), *range(1, 6)])
        symbol = pick([SYMBOL] * 30 + ["OTHER"])
    order = OrderSpec(
        order_id=oid(0),
        broker_id=pick(clients.brokers),
        document_number=pick(clients.documents),
        symbol=symbol,
        side=side,
        order_type=order_type,
        time_in_force=tif,
        price=price,
        quantity=quantity,
        valid_until=valid_until,
        stp=pick(clients.stp_modes),
    )
    return PlaceOp(order, pick(REUSE))


def make_op(pick: Pick, clients: Clients, kinds: Sequence[str] = OP_KINDS) -> Op:
    kind = pick(kinds)
    if kind == "place":
        return make_place(pick, clients)
    if kind == "expire":
        return ExpireOp(pick(EXPIRE_LIMITS))
    target = Target(pick(TARGET_POOLS), pick(range(32)))
    if kind == "cancel":
        return CancelOp(target)
    return AmendOp(target, pick(AMEND_QUANTITY), pick(AMEND_PRICE))


def random_op(rnd: random.Random, clients: Clients = MIXED) -> Op:
    """One op from ``rnd``, the same shapes as :data:`sequences` (used for long sequences)."""
    return make_op(rnd.choice, clients, LONG_OP_KINDS)


_INDEXES: dict[int, st.SearchStrategy[int]] = {}


def _index(n: int) -> st.SearchStrategy[int]:
    """``integers(0, n - 1)``, built once per ``n``: a strategy built per draw (``sampled_from(options)`` on every
    pick) was most of the generation time. Shrinks toward index 0, as ``sampled_from`` does."""
    strategy = _INDEXES.get(n)
    if strategy is None:
        strategy = _INDEXES[n] = st.integers(0, n - 1)
    return strategy


@st.composite
def _ops(draw: st.DrawFn, clients: Clients) -> Op:
    def pick(options: Sequence[T]) -> T:
        return options[draw(_index(len(options)))] if len(options) > 1 else options[0]

    return make_op(pick, clients)


Drawn = list[tuple[Op, int]]
sequences: st.SearchStrategy[Drawn] = st.sampled_from(POPULATIONS).flatmap(
    lambda clients: st.lists(st.tuples(_ops(clients), st.integers(0, 3)), min_size=15, max_size=80)
)
"""A sequence of ops, all from one population of clients, with the clock step before each (0-3 microseconds)."""


@st.composite
def _sequences_and_switch(draw: st.DrawFn) -> tuple[Drawn, int]:
    drawn = draw(sequences)
    return drawn, draw(st.integers(0, len(drawn)))  # len(drawn): no switch


sequences_and_switch: st.SearchStrategy[tuple[Drawn, int]] = _sequences_and_switch()
"""A sequence and the command from which :func:`check_against_reference` runs on a rebuilt book."""


def to_commands(drawn: Drawn) -> list[tuple[Command, int]]:
    """Concrete commands with seq 1, 2, ... and a clock that only moves forward.

    Cancel and amend targets are resolved against a shadow book that applies the commands as they are built, so
    most of them name an order that is actually resting; the shadow only steers the choice (any id is a valid
    input), and the property tests check every book against the reference independently of it."""
    out: list[tuple[Command, int]] = []
    placed: list[UUID] = []
    shadow = OrderBook(SYMBOL)
    now = T0

    def resolve(target: Target) -> tuple[UUID, RestingOrder | None]:
        if target.pool == "resting":
            resting = shadow.resting_orders()
            if resting:
                order = resting[target.k % len(resting)]
                return order.order_id, order
        if target.pool != "unknown" and placed:
            order_id = placed[-1 - target.k % len(placed)]
            return order_id, shadow.get(order_id)
        return oid(10_000 + target.k), None

    for seq, (op, dt) in enumerate(drawn, start=1):
        now += dt
        command: Command
        if isinstance(op, PlaceOp):
            order_id = oid(seq) if op.reuse is None or op.reuse >= len(placed) else placed[-1 - op.reuse]
            valid_until = None if op.order.valid_until is None else now + op.order.valid_until
            command = Place(seq, replace(op.order, order_id=order_id, valid_until=valid_until))
            placed.append(order_id)
        elif isinstance(op, CancelOp):
            command = Cancel(seq, resolve(op.target)[0])
        elif isinstance(op, AmendOp):
            order_id, target = resolve(op.target)
            quantity, price = (5, 100) if target is None else (target.quantity, target.price)
            command = Amend(
                seq,
                order_id,
                None if op.quantity is None else quantity + op.quantity,
                None if op.price is None else price + op.price,
            )
        else:
            command = ExpireDue(seq, op.limit)
        shadow.apply(command, now)
        out.append((command, now))
    return out


def commit_order(n: int, rnd: random.Random) -> list[int]:
    """The seqs 1..n in the order their transactions commit: each is late with probability 0.3, by 1 to
    ``LATE_WINDOW`` positions (a transaction that took its seq first can commit after several later ones)."""
    delays = [rnd.randint(1, LATE_WINDOW) if rnd.random() < 0.3 else 0 for _ in range(n)]
    return sorted(range(1, n + 1), key=lambda seq: (seq - 1 + delays[seq - 1], seq))


# ------------------------------------------------------------------------------------------- invariant tracker


@dataclass
class Track:
    side: Side
    price: int | None
    quantity: int
    filled: int
    valid_until: int | None


class Ledger:
    """Follows every order through the events alone and checks share conservation and fill legality."""

    def __init__(self) -> None:
        self.open: dict[UUID, Track] = {}

    def feed(self, command: Command, events: list[Event], now: int) -> None:
        for event in events:
            if isinstance(event, Accepted):
                assert isinstance(command, Place)
                assert event.order_id not in self.open, "accepted an id that is live"
                order = command.order
                self.open[event.order_id] = Track(order.side, order.price, order.quantity, 0, order.valid_until)
            elif isinstance(event, Fill):
                maker = self.open[event.maker_order_id]  # KeyError = fill with a closed/unknown order
                taker = self.open[event.taker_order_id]
                assert maker.valid_until is None or maker.valid_until > now, "fill with an expired maker"
                assert maker.side != taker.side
                assert taker.side == event.taker_side
                assert event.quantity > 0
                self.check_price(event, maker, taker)
                maker.filled += event.quantity
                taker.filled += event.quantity
                assert event.maker_remaining == maker.quantity - maker.filled
                assert event.taker_remaining == taker.quantity - taker.filled
            elif isinstance(event, Amended):
                track = self.open[event.order_id]
                track.quantity, track.price = event.quantity, event.price
                assert event.remaining == track.quantity - track.filled > 0
            elif isinstance(event, Decremented):
                track = self.open[event.order_id]
                assert event.quantity < track.quantity
                track.quantity = event.quantity
                assert event.remaining == track.quantity - track.filled > 0
            elif isinstance(event, Rested):
                track = self.open[event.order_id]
                assert event.remaining == track.quantity - track.filled > 0
            elif isinstance(event, Closed):
                track = self.open.pop(event.order_id)
                assert track.quantity == event.remaining + track.filled, "shares not conserved"

    @staticmethod
    def check_price(fill: Fill, maker: Track, taker: Track) -> None:
        assert maker.price is not None
        if fill.taker_side is Side.BID:
            assert fill.price == maker.price
            assert taker.price is None or maker.price <= taker.price
        elif taker.price is None:
            assert fill.price == maker.price
        else:
            assert fill.price == taker.price <= maker.price

    def check_book(self, book: OrderBook, resting: list[RestingOrder]) -> None:
        """``resting`` is ``book.resting_orders()``, read once by the caller."""
        assert {o.order_id for o in resting} == set(self.open), "a live order neither rests nor is closed"
        for order in resting:
            track = self.open[order.order_id]
            assert order.quantity == track.quantity
            assert order.remaining == track.quantity - track.filled > 0
        bid, ask = book.best_bid(), book.best_ask()
        assert bid is None or ask is None or bid < ask, "crossed book"


# ------------------------------------------------------------------------------------------------ properties


def check_against_reference(
    commands: list[tuple[Command, int]], switch: int, cap: int = MAX_TAKER_MATCHES
) -> list[tuple[Command, list[Event]]]:
    """Same events and state as the reference after every command, invariants hold, and from command ``switch``
    on the engine is replaced by a book rebuilt from its resting orders (which must behave identically). Both books
    have the match cap ``cap``. Returns each command with its events, for tests that check what the sequences
    reached."""
    engine = OrderBook(SYMBOL, max_taker_matches=cap)
    reference = ReferenceBook(SYMBOL, max_taker_matches=cap)
    ledger = Ledger()
    every: list[tuple[Command, list[Event]]] = []
    for i, (command, now) in enumerate(commands):
        if i == switch:
            engine = OrderBook.rebuild(SYMBOL, engine.resting_orders(), max_taker_matches=cap)
        events = engine.apply(command, now)
        assert events == reference.apply(command, now), f"command {i}: {command}"
        if isinstance(command, Place | Amend):
            work = [e for e in events if not (isinstance(e, Closed) and e.reason is CloseReason.EXPIRED)]
            assert len(work) <= 2 * cap + 2, "more events than the match cap allows"
        every.append((command, events))
        ledger.feed(command, events, now)
        # Each state is read once per command (the checks dominate the run time, not the books).
        resting = engine.resting_orders()
        ledger.check_book(engine, resting)
        reference_resting = reference.resting_orders()
        assert resting == reference_resting
        state_hash = engine.state_hash()
        assert state_hash == hash_resting(reference.symbol, reference_resting)  # = reference.state_hash()
        assert len(engine) == len(reference.orders)
        # A rebuilt book holds the same state (its state_hash is a function of resting_orders alone).
        assert OrderBook.rebuild(SYMBOL, resting).resting_orders() == resting
    assert engine.state_hash() == reference.state_hash()
    return every


@given(sequences_and_switch)
def test_engine_matches_reference_and_keeps_invariants(case: tuple[Drawn, int]) -> None:
    drawn, switch = case
    check_against_reference(to_commands(drawn), switch)


@given(st.integers(0, 2**32 - 1))
def test_long_random_sequences_match_reference(seed: int) -> None:
    rnd = random.Random(seed)
    clients = rnd.choice(POPULATIONS)
    drawn = [(random_op(rnd, clients), rnd.randint(0, 2)) for _ in range(300)]
    check_against_reference(to_commands(drawn), rnd.randint(0, 300))


SMALL_CAPS = st.integers(1, 3)
"""Match caps the generated books reach often (the real one, 1,000 makers, they never do)."""


@given(sequences_and_switch, SMALL_CAPS)
def test_engine_matches_reference_with_a_small_match_cap(case: tuple[Drawn, int], cap: int) -> None:
    drawn, switch = case
    check_against_reference(to_commands(drawn), switch, cap)


@given(st.integers(0, 2**32 - 1), SMALL_CAPS)
def test_long_random_sequences_match_reference_with_a_small_match_cap(seed: int, cap: int) -> None:
    rnd = random.Random(seed)
    drawn = [(random_op(rnd, rnd.choice(POPULATIONS)), rnd.randint(0, 2)) for _ in range(300)]
    check_against_reference(to_commands(drawn), rnd.randint(0, 300), cap)


def test_long_random_sequences_reach_the_match_cap() -> None:
    """The capped property tests are worth something only if their sequences do reach the cap: GTC/GTD places and
    amends closed ``MATCH_LIMIT``, and more IOC/market/FOK orders closed ``UNFILLED`` than without the cap."""
    reached: set[type] = set()
    unfilled = {1: 0, MAX_TAKER_MATCHES: 0}
    for seed in range(20):
        rnd = random.Random(seed)
        drawn = [(random_op(rnd, MIXED), rnd.randint(0, 2)) for _ in range(300)]
        for cap in unfilled:
            for command, events in check_against_reference(to_commands(drawn), 300, cap):
                for e in events:
                    if isinstance(e, Closed) and e.reason is CloseReason.MATCH_LIMIT:
                        reached.add(type(command))
                    unfilled[cap] += isinstance(e, Closed) and e.reason is CloseReason.UNFILLED
    assert reached == {Place, Amend}
    assert unfilled[1] > unfilled[MAX_TAKER_MATCHES]


@given(sequences, st.randoms(use_true_random=False))
def test_rebuild_from_shuffled_resting_orders_gives_the_same_state(drawn: Drawn, rnd: random.Random) -> None:
    engine = OrderBook(SYMBOL)
    for command, now in to_commands(drawn):
        engine.apply(command, now)
    resting = engine.resting_orders()
    rnd.shuffle(resting)
    rebuilt = OrderBook.rebuild(SYMBOL, resting)
    assert rebuilt.state_hash() == engine.state_hash()
    assert rebuilt.resting_orders() == engine.resting_orders()


@given(sequences)
def test_depth_and_queries_agree_with_resting_orders(drawn: Drawn) -> None:
    engine = OrderBook(SYMBOL)
    for command, now in to_commands(drawn):
        engine.apply(command, now)
    resting = engine.resting_orders()
    expected: dict[Side, dict[int, list[int]]] = {Side.BID: {}, Side.ASK: {}}
    for order in resting:
        level = expected[order.side].setdefault(order.price, [0, 0])
        level[0] += order.remaining
        level[1] += 1
    bids, asks = engine.depth(100)
    assert bids == [(p, q, n) for p, (q, n) in sorted(expected[Side.BID].items(), reverse=True)]
    assert asks == [(p, q, n) for p, (q, n) in sorted(expected[Side.ASK].items())]
    assert engine.depth(1) == (bids[:1], asks[:1])
    assert engine.best_bid() == (bids[0][0] if bids else None)
    assert engine.best_ask() == (asks[0][0] if asks else None)
    for order in resting:
        assert engine.get(order.order_id) == order


@given(sequences_and_switch, st.randoms(use_true_random=False))
def test_late_committed_commands_queue_by_seq_like_the_reference_and_a_rebuild(
    case: tuple[Drawn, int], rnd: random.Random
) -> None:
    """Commands are applied in commit order, which may differ from seq order (a transaction that took its seq
    first can commit after several later ones). The book must still queue by seq, so the cached book and a book
    rebuilt from the open orders (ordered by priority) agree."""
    drawn, switch = case
    commands = to_commands(drawn)
    seqs = commit_order(len(commands), rnd)
    late = [(replace(command, seq=seq), now) for (command, now), seq in zip(commands, seqs, strict=True)]
    check_against_reference(late, switch)
