"""Property tests: the fast engine against the naive reference, plus the book invariants, on random sequences.

Sequences use a small price range, a small pool of order ids (so cancels/amends hit live, closed and unknown ids
and places hit duplicate ids), three brokers x two document numbers, every order type / TIF / STP mode, some
invalid inputs, a clock that moves forward and ``ExpireDue`` sweeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from exchange.engine import (
    Accepted,
    Amend,
    Amended,
    Cancel,
    Closed,
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
    Side,
    StpMode,
    TimeInForce,
)
from exchange.engine.reference import ReferenceBook
from tests.unit.support import SYMBOL, T0, oid

BROKERS = [UUID(int=0xA), UUID(int=0xB), UUID(int=0xC)]
LIMIT_TIFS = [TimeInForce.GTC] * 3 + [TimeInForce.GTD] * 2 + [TimeInForce.IOC, TimeInForce.FOK]
MARKET_TIFS = [TimeInForce.IOC] * 2 + [TimeInForce.FOK] * 2 + [TimeInForce.GTC]


@dataclass(frozen=True)
class PlaceOp:
    order: OrderSpec
    """``order_id`` is a placeholder; ``valid_until`` is an offset from the command's ``now``."""
    reuse: int | None
    """None: a fresh id; k: the id of the k-th most recently placed order (live: duplicate; closed: reuse)."""


@dataclass(frozen=True)
class CancelOp:
    target: int
    """k < 8: the k-th most recently placed order (may be live or closed); otherwise an id never placed."""


@dataclass(frozen=True)
class AmendOp:
    target: int
    quantity: int | None
    price: int | None


@dataclass(frozen=True)
class ExpireOp:
    pass


Op = PlaceOp | CancelOp | AmendOp | ExpireOp


@st.composite
def place_ops(draw: st.DrawFn) -> PlaceOp:
    order_type = draw(st.sampled_from([OrderType.LIMIT] * 6 + [OrderType.MARKET]))
    price: int | None
    if order_type is OrderType.MARKET:
        tif = draw(st.sampled_from(MARKET_TIFS))
        price = draw(st.sampled_from([None] * 10 + [100]))  # a priced market order is invalid
    else:
        tif = draw(st.sampled_from(LIMIT_TIFS))
        price = draw(st.sampled_from([*range(95, 106)] * 5 + [0, -5, None]))
    if tif is TimeInForce.GTD:
        valid_until = draw(st.sampled_from([None, *range(-2, 10)]))
    elif tif in (TimeInForce.IOC, TimeInForce.FOK):  # optional; at or before now the order expires untraded
        valid_until = draw(st.sampled_from([None] * 6 + [-1, 0, 1, 5]))
    else:  # a GTC with one is invalid
        valid_until = draw(st.sampled_from([None] * 20 + [5]))
    order = OrderSpec(
        order_id=oid(0),
        broker_id=draw(st.sampled_from(BROKERS)),
        document_number=draw(st.sampled_from(["d1", "d2"])),
        symbol=draw(st.sampled_from([SYMBOL] * 30 + ["OTHER"])),
        side=draw(st.sampled_from(Side)),
        order_type=order_type,
        time_in_force=tif,
        price=price,
        quantity=draw(st.sampled_from([0, -1, *range(1, 11), *range(1, 11), *range(1, 11), *range(1, 6)])),
        valid_until=valid_until,
        stp=draw(st.sampled_from([StpMode.NONE, StpMode.NONE, *StpMode])),
    )
    reuse = draw(st.sampled_from([None] * 20 + [0, 1, 2, 3, 5]))
    return PlaceOp(order, reuse)


TARGETS = st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4, 6, 9])
ops: st.SearchStrategy[Op] = st.one_of(
    place_ops(),
    place_ops(),
    place_ops(),
    place_ops(),
    st.builds(CancelOp, TARGETS),
    st.builds(
        AmendOp,
        TARGETS,
        st.one_of(st.none(), st.integers(0, 14)),
        st.one_of(st.none(), st.integers(94, 106), st.just(0)),
    ),
    st.just(ExpireOp()),
)
Drawn = list[tuple[Op, int]]
sequences: st.SearchStrategy[Drawn] = st.lists(st.tuples(ops, st.integers(0, 3)), min_size=8, max_size=60)


def to_commands(drawn: Drawn) -> list[tuple[Command, int]]:
    """Concrete commands with seq 1, 2, ... and a clock that only moves forward."""
    out: list[tuple[Command, int]] = []
    placed: list[UUID] = []
    now = T0

    def recent(k: int) -> UUID:
        return placed[-1 - k] if k < min(len(placed), 8) else oid(10_000 + k)

    for seq, (op, dt) in enumerate(drawn, start=1):
        now += dt
        command: Command
        if isinstance(op, PlaceOp):
            order_id = oid(seq) if op.reuse is None or op.reuse >= len(placed) else placed[-1 - op.reuse]
            valid_until = None if op.order.valid_until is None else now + op.order.valid_until
            command = Place(seq, replace(op.order, order_id=order_id, valid_until=valid_until))
            placed.append(order_id)
        elif isinstance(op, CancelOp):
            command = Cancel(seq, recent(op.target))
        elif isinstance(op, AmendOp):
            command = Amend(seq, recent(op.target), op.quantity, op.price)
        else:
            command = ExpireDue(seq)
        out.append((command, now))
    return out


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

    def check_book(self, book: OrderBook) -> None:
        resting = book.resting_orders()
        assert {o.order_id for o in resting} == set(self.open), "a live order neither rests nor is closed"
        for order in resting:
            track = self.open[order.order_id]
            assert order.quantity == track.quantity
            assert order.remaining == track.quantity - track.filled > 0
        bid, ask = book.best_bid(), book.best_ask()
        assert bid is None or ask is None or bid < ask, "crossed book"


# ------------------------------------------------------------------------------------------------ properties


def check_against_reference(commands: list[tuple[Command, int]], switch: int) -> None:
    """Same events and state as the reference after every command, invariants hold, and from command ``switch``
    on the engine is replaced by a book rebuilt from its resting orders (which must behave identically)."""
    engine = OrderBook(SYMBOL)
    reference = ReferenceBook(SYMBOL)
    ledger = Ledger()
    for i, (command, now) in enumerate(commands):
        if i == switch:
            engine = OrderBook.rebuild(SYMBOL, engine.resting_orders())
        events = engine.apply(command, now)
        assert events == reference.apply(command, now), f"command {i}: {command}"
        ledger.feed(command, events, now)
        ledger.check_book(engine)
        assert engine.resting_orders() == reference.resting_orders()
        assert engine.state_hash() == reference.state_hash()
        assert len(engine) == len(reference.orders)
        assert OrderBook.rebuild(SYMBOL, engine.resting_orders()).state_hash() == engine.state_hash()


@given(sequences, st.integers(0, 60))
def test_engine_matches_reference_and_keeps_invariants(drawn: Drawn, switch: int) -> None:
    check_against_reference(to_commands(drawn), switch)


def random_op(rnd: random.Random) -> Op:
    """One op from ``rnd`` with the same shape as the ``ops`` strategy (used for long sequences)."""
    kind = rnd.random()
    if kind < 0.65:
        market = rnd.random() < 0.15
        tif = rnd.choice(MARKET_TIFS if market else LIMIT_TIFS)
        if tif is TimeInForce.GTD:
            offset: int | None = rnd.randint(-2, 12)
        elif tif in (TimeInForce.IOC, TimeInForce.FOK) and rnd.random() < 0.3:
            offset = rnd.randint(-1, 5)
        else:
            offset = None
        order = OrderSpec(
            order_id=oid(0),
            broker_id=rnd.choice(BROKERS),
            document_number=rnd.choice(["d1", "d2"]),
            symbol=SYMBOL if rnd.random() < 0.98 else "OTHER",
            side=rnd.choice([Side.BID, Side.ASK]),
            order_type=OrderType.MARKET if market else OrderType.LIMIT,
            time_in_force=tif,
            price=None if market else (rnd.randint(95, 105) if rnd.random() < 0.98 else 0),
            quantity=rnd.randint(1, 10) if rnd.random() < 0.98 else 0,
            valid_until=offset,
            stp=rnd.choice([StpMode.NONE, StpMode.NONE, StpMode.NONE, *StpMode]),
        )
        return PlaceOp(order, None if rnd.random() < 0.97 else rnd.randint(0, 4))
    if kind < 0.80:
        return CancelOp(rnd.randint(0, 9))
    if kind < 0.97:
        quantity = rnd.choice([None, rnd.randint(0, 14)])
        price = rnd.choice([None, None, rnd.randint(94, 106)])
        return AmendOp(rnd.randint(0, 9), quantity, price)
    return ExpireOp()


@given(st.integers(0, 2**32 - 1))
def test_long_random_sequences_match_reference(seed: int) -> None:
    rnd = random.Random(seed)
    drawn = [(random_op(rnd), rnd.randint(0, 2)) for _ in range(300)]
    check_against_reference(to_commands(drawn), rnd.randint(0, 300))


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


@given(sequences, st.integers(0, 60), st.randoms(use_true_random=False))
def test_late_committed_commands_queue_by_seq_like_the_reference_and_a_rebuild(
    drawn: Drawn, switch: int, rnd: random.Random
) -> None:
    """Commands are applied in commit order, which may differ from seq order (a transaction that took its seq
    first can commit last). The book must still queue by seq, so the cached book and a book rebuilt from the
    open orders (ordered by priority) agree."""
    commands = to_commands(drawn)
    seqs = [command.seq for command, _ in commands]
    for i in range(len(seqs) - 1):
        if rnd.random() < 0.3:
            seqs[i], seqs[i + 1] = seqs[i + 1], seqs[i]
    late = [(replace(command, seq=seq), now) for (command, now), seq in zip(commands, seqs, strict=True)]
    check_against_reference(late, switch)
