"""The matching engine: one :class:`OrderBook` per symbol, pure and deterministic.

``book.apply(command, now)`` mutates the book and returns the events describing what happened. It does no I/O,
reads no clock, draws no random number and invents no id: the same commands with the same ``now`` values always
produce the same events and the same :meth:`OrderBook.state_hash`.

Rules (see DESIGN.md section 4 and the docstrings in :mod:`exchange.engine.types`):

* Price-time priority: best price first, FIFO within a level. The FIFO is arrival order, which equals ascending
  ``priority``: an order is queued behind every order of its level with a lower ``priority`` and in front of any with a
  higher one (a command that committed late can carry a lower ``seq`` than commands already applied).
* Execution price is the seller's price: an incoming bid trades at the resting ask's price, an incoming limit ask
  at its own limit, a market ask at the resting bid's price.
* An order is expired when ``valid_until <= now``. A GTD order must carry a ``valid_until``, an IOC/FOK order
  (limit or market) may (it bounds when the order may trade), a GTC order must not. An expired order never
  trades: an incoming one is closed before matching; matching closes expired resting orders
  (``Closed(EXPIRED)``) when it reaches them and continues; :class:`ExpireDue` closes all of them. Only resting
  (GTC/GTD) orders are in the book, so an IOC/FOK's ``valid_until`` never enters the expiry heap.

Event order (identical in :mod:`exchange.engine.reference`):

* ``Place``: ``Rejected`` alone if invalid. Otherwise ``Accepted``; then, for each maker reached in priority order,
  either ``Closed(maker, EXPIRED)``, or the self-trade-prevention events (below), or ``Fill`` followed by
  ``Closed(maker, FILLED)`` when that fill emptied the maker; then exactly one terminal event for the taker unless
  STP already closed it: ``Closed(FILLED)`` if nothing is left, ``Closed(MATCH_LIMIT)`` for a GTC/GTD limit remainder
  that reached the match cap (below), ``Rested`` for any other GTC/GTD limit remainder, otherwise
  ``Closed(UNFILLED)``. An incoming order already expired (a GTD, or an IOC/FOK, limit or market, carrying a
  ``valid_until <= now``) gives ``Accepted, Closed(EXPIRED, quantity)`` and touches nothing (this is checked
  before FOK feasibility); an infeasible FOK gives ``Accepted, Closed(UNFILLED)`` and touches nothing.
* STP (taker's mode, when maker and taker have the same broker *and* document number): ``cancel_newest`` →
  ``Closed(taker, SELF_TRADE)``, stop; ``cancel_oldest`` → ``Closed(maker, SELF_TRADE)``, continue;
  ``cancel_both`` → ``Closed(maker, SELF_TRADE)``, ``Closed(taker, SELF_TRADE)``, stop; ``decrement`` by
  ``d = min(taker, maker remaining)``: maker event first (``Closed(SELF_TRADE, remaining=d)`` if it reaches 0,
  else ``Decremented``), then the taker's (``Closed(SELF_TRADE, remaining=d)`` and stop, else ``Decremented``).
* Match cap (:data:`~exchange.engine.types.MAX_TAKER_MATCHES`, or the book's ``max_taker_matches``): a taker
  matches at most that many makers in one command; a fill counts one, and so does a maker that STP closes or
  decrements (``cancel_oldest``, ``decrement``); an expired maker closed on the way does not. When the taker has
  matched the cap and reaches one more maker that is not expired (within its limit: that is, its price still
  crosses a live order), it stops there and closes its remainder: ``Closed(MATCH_LIMIT)`` for a GTC/GTD limit order
  (placed or amended: it never rests crossing the book), ``Closed(UNFILLED)`` otherwise. A taker whose crossing
  makers run out exactly at the cap is not capped (a GTC/GTD remainder rests as usual).
* FOK feasibility is decided before anything changes by walking the crossing makers in priority order: expired
  makers are skipped; a self maker counts as liquidity when the taker's ``stp`` is ``none``, is skipped under
  ``cancel_oldest``, and makes the FOK infeasible under ``cancel_newest``, ``cancel_both`` and ``decrement``
  (each of those would cancel or shrink the taker, so its whole quantity could not trade).
  The FOK is feasible iff the counted liquidity reaches its quantity before the walk hits one of those, and
  within the match cap (each counted maker and each skipped ``cancel_oldest`` self maker is one match): a FOK that
  would need more matches than the cap to fill in full is killed whole.
* ``Cancel``: ``Closed(CANCELLED, remaining)``; ``Closed(EXPIRED, remaining)`` if the order is resting past its
  ``valid_until`` (expired, not yet swept: the same close reason as if ``ExpireDue`` had come first); or
  ``Rejected(UNKNOWN_ORDER)``.
* ``Amend``: ``Rejected`` alone if invalid. Otherwise ``Amended`` first. Quantity down (or unchanged) at the same
  price keeps priority and changes the order in place. A price change or a quantity increase moves it to the back
  of its (new) level with ``priority = seq``; if the new price crosses the opposite best price it first matches as
  a taker exactly like a ``Place`` (its own ``stp``, the match cap), followed by the taker's terminal event
  (``Rested``, ``Closed(FILLED)`` or ``Closed(MATCH_LIMIT)``) unless STP closed it. A non-crossing amend emits only
  ``Amended``.
* ``ExpireDue``: ``Closed(EXPIRED)`` for every resting order with ``valid_until <= now`` (with a ``limit``, for the
  first ``limit`` of them by ``(valid_until, priority, order_id)``), ordered by ``(priority, order_id)``.

Validation order for ``Place``: ``WRONG_SYMBOL``, ``DUPLICATE_ORDER_ID``, ``INVALID_QUANTITY``,
``INVALID_PRICE``, ``INVALID_TIME_IN_FORCE``. For ``Amend``: ``UNKNOWN_ORDER``, ``INVALID_QUANTITY``,
``INVALID_PRICE``, ``NOT_AMENDABLE``. Integers must be real ``int`` (``bool`` is rejected).

Duplicate ids: only an id that is *live* in this book is a ``DUPLICATE_ORDER_ID``. Ids of closed orders are not
remembered (memory stays bounded and a rebuilt book behaves exactly like the book it was rebuilt from); refusing
reuse of a closed id is the persistence layer's job (the orders table's primary key).

Implementation: per side a dict ``price -> _Level`` (a deque in FIFO order plus a live count) and a sorted list of
level keys with the best level last (bid keys are prices, ask keys are negated prices), so the best level is
``keys[-1]`` and removing it is ``list.pop()``. Orders removed from the middle of a level (cancel, amend, sweep)
are deleted lazily: they are marked dead by ``remaining = 0`` (a live resting order always has remaining > 0) and
skipped/dropped when reached; a level is compacted when dead entries dominate. GTD orders also go into a min-heap
by ``(valid_until, priority, order_id)`` so :class:`ExpireDue` does not scan the book, and a limited one takes the
same orders from a live book as from its rebuild (an insertion counter would order equal deadlines differently).
"""

from __future__ import annotations

import heapq
from bisect import insort
from collections import deque
from collections.abc import Iterable
from operator import attrgetter

from exchange.engine._construct import accepted as _accepted
from exchange.engine._construct import closed as _closed
from exchange.engine._construct import fill as _fill
from exchange.engine._construct import rested as _rested
from exchange.engine.hashing import hash_resting
from exchange.engine.types import (
    MAX_TAKER_MATCHES,
    Amend,
    Amended,
    BrokerId,
    Cancel,
    CloseReason,
    Command,
    Decremented,
    Event,
    ExpireDue,
    Micros,
    OrderId,
    OrderSpec,
    OrderType,
    Place,
    Rejected,
    RejectReason,
    RestingOrder,
    Side,
    StpMode,
    TimeInForce,
)

DepthLevel = tuple[int, int, int]
"""``(price, total_quantity, order_count)`` of one aggregated price level."""

_BID = Side.BID
_ASK = Side.ASK
_LIMIT = OrderType.LIMIT
_MARKET = OrderType.MARKET
_GTC = TimeInForce.GTC
_GTD = TimeInForce.GTD
_IOC = TimeInForce.IOC
_FOK = TimeInForce.FOK
_STP_NONE = StpMode.NONE
_CANCEL_NEWEST = StpMode.CANCEL_NEWEST
_CANCEL_OLDEST = StpMode.CANCEL_OLDEST
_CANCEL_BOTH = StpMode.CANCEL_BOTH
_FILLED = CloseReason.FILLED
_CANCELLED = CloseReason.CANCELLED
_EXPIRED = CloseReason.EXPIRED
_UNFILLED = CloseReason.UNFILLED
_SELF_TRADE = CloseReason.SELF_TRADE
_MATCH_LIMIT = CloseReason.MATCH_LIMIT
_by_priority = attrgetter("priority")


class _Level:
    """One price level: FIFO of orders (live and lazily-deleted dead ones) and the number of live ones.

    Invariant: ``live`` == number of entries with ``remaining > 0``; a level with ``live == 0`` is removed."""

    __slots__ = ("live", "orders")

    def __init__(self) -> None:
        self.orders: deque[RestingOrder] = deque()
        self.live = 0


def _copy(o: RestingOrder) -> RestingOrder:
    """Resting orders are mutable; the book never shares its own objects with callers."""
    return RestingOrder(
        o.order_id,
        o.broker_id,
        o.document_number,
        o.side,
        o.price,
        o.quantity,
        o.remaining,
        o.priority,
        o.valid_until,
        o.stp,
    )


def _place_reject_reason(spec: OrderSpec) -> RejectReason | None:
    """Symbol and duplicate checks are done by the caller; this is the spec's own consistency."""
    quantity = spec.quantity
    if type(quantity) is not int or quantity <= 0:
        return RejectReason.INVALID_QUANTITY
    price = spec.price
    tif = spec.time_in_force
    if spec.order_type == _MARKET:
        if price is not None:
            return RejectReason.INVALID_PRICE
        if tif != _IOC and tif != _FOK:
            return RejectReason.INVALID_TIME_IN_FORCE
    elif spec.order_type == _LIMIT:
        if type(price) is not int or price <= 0:
            return RejectReason.INVALID_PRICE
    else:
        return RejectReason.INVALID_PRICE  # unknown order type: no valid price rule applies
    valid_until = spec.valid_until
    if tif == _GTD:
        if type(valid_until) is not int:
            return RejectReason.INVALID_TIME_IN_FORCE
    elif tif == _GTC:
        if valid_until is not None:
            return RejectReason.INVALID_TIME_IN_FORCE
    elif tif in (_IOC, _FOK):
        # Optional: an IOC/FOK never rests, but its deadline still bounds when it may trade (DESIGN §4).
        if valid_until is not None and type(valid_until) is not int:
            return RejectReason.INVALID_TIME_IN_FORCE
    else:
        return RejectReason.INVALID_TIME_IN_FORCE
    return None


class OrderBook:
    """The live resting orders of one symbol and the rules that change them.

    Invariants after every :meth:`apply`: no crossed book (``best_bid() < best_ask()`` when both exist); every
    resting order has ``0 < remaining <= quantity`` and ``quantity - remaining`` equal to its filled quantity;
    ``OrderBook.rebuild(symbol, book.resting_orders())`` has the same :meth:`state_hash`.
    ``seq`` is the FIFO priority. Commands normally arrive with increasing ``seq``, but one whose transaction
    committed late may arrive after higher ones; it is then queued by its ``seq``, as a rebuild would queue it.
    """

    __slots__ = (
        "_ask_keys",
        "_asks",
        "_bid_keys",
        "_bids",
        "_expiry",
        "_expiry_counter",
        "_orders",
        "max_taker_matches",
        "symbol",
    )

    def __init__(self, symbol: str, *, max_taker_matches: int = MAX_TAKER_MATCHES) -> None:
        if type(max_taker_matches) is not int or max_taker_matches < 1:
            raise ValueError(f"max_taker_matches must be an int >= 1, not {max_taker_matches!r}")
        self.symbol = symbol
        self.max_taker_matches = max_taker_matches
        """The match cap of one taker command (see the module docstring): a rule of the book, not part of its state
        (``state_hash`` ignores it)."""
        self._orders: dict[int, RestingOrder] = {}  # keyed by order_id.int: UUID.__hash__ is Python code
        self._bids: dict[int, _Level] = {}
        self._asks: dict[int, _Level] = {}
        self._bid_keys: list[int] = []  # prices ascending: best bid last
        self._ask_keys: list[int] = []  # negated prices ascending: best (lowest) ask last
        # (valid_until, priority, order_id.int, counter, order) min-heap; the counter (unique) keeps the comparison
        # from ever reaching the order, should an order be in it twice (it is not compared otherwise).
        self._expiry: list[tuple[int, int, int, int, RestingOrder]] = []
        self._expiry_counter = 0

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def rebuild(
        cls,
        symbol: str,
        resting: Iterable[RestingOrder],
        *,
        handed_over: bool = False,
        max_taker_matches: int = MAX_TAKER_MATCHES,
    ) -> OrderBook:
        """A book holding copies of ``resting``. Each level is ordered by ``priority`` (stable, so orders given in
        priority order keep it), which reproduces the state of the book they were taken from. With
        ``handed_over`` the book keeps the given objects themselves (the caller made them for it and keeps no
        reference: the matcher's rebuild from Postgres, ~0.4 µs an order less).

        Raises ``ValueError`` on a state no book can be in: duplicate ids, ``remaining`` outside
        ``1..quantity``, a non-positive price, or a crossed book."""
        book = cls(symbol, max_taker_matches=max_taker_matches)
        orders = book._orders
        per_price: dict[tuple[bool, int], list[RestingOrder]] = {}
        for src in resting:
            o = src if handed_over else _copy(src)
            if o.order_id.int in orders:
                raise ValueError(f"duplicate resting order id {o.order_id}")
            if not 0 < o.remaining <= o.quantity or o.price <= 0:
                raise ValueError(f"impossible resting order {o!r}")
            orders[o.order_id.int] = o
            key = (o.side == _BID, o.price)
            bucket = per_price.get(key)
            if bucket is None:
                per_price[key] = [o]
            else:
                bucket.append(o)
        expiry = book._expiry
        for (is_bid, price), bucket in per_price.items():
            bucket.sort(key=_by_priority)
            level = _Level()
            level.orders.extend(bucket)
            level.live = len(bucket)
            if is_bid:
                book._bids[price] = level
            else:
                book._asks[price] = level
            for o in bucket:
                if o.valid_until is not None:
                    book._expiry_counter += 1
                    expiry.append((o.valid_until, o.priority, o.order_id.int, book._expiry_counter, o))
        heapq.heapify(expiry)
        book._bid_keys = sorted(book._bids)
        book._ask_keys = sorted(-p for p in book._asks)
        bid, ask = book.best_bid(), book.best_ask()
        if bid is not None and ask is not None and bid >= ask:
            raise ValueError(f"crossed book: best bid {bid} >= best ask {ask}")
        return book

    # ------------------------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._orders)

    def best_bid(self) -> int | None:
        return self._bid_keys[-1] if self._bid_keys else None

    def best_ask(self) -> int | None:
        return -self._ask_keys[-1] if self._ask_keys else None

    def get(self, order_id: OrderId) -> RestingOrder | None:
        """A copy of the resting order, or ``None`` if it is not live in this book."""
        o = self._orders.get(order_id.int)
        return None if o is None else _copy(o)

    def more_due_than(self, count: int, now: Micros) -> bool:
        """Whether more than ``count`` resting orders are expired at ``now`` (``valid_until <= now``). Pops the due
        entries of the expiry heap in deadline order until ``count + 1`` live ones are found (or none is left) and
        pushes those back: about ``count`` steps however big the backlog. The stale due entries it meets (orders
        cancelled or filled before their deadline: only an add compacts the heap) are dropped for good, so a second
        call does not meet them again (the matcher asks before every batch of the book). The live entries and their
        keys are unchanged: a limited ``ExpireDue`` takes the same orders after it."""
        heap = self._expiry
        orders = self._orders
        live: list[tuple[int, int, int, int, RestingOrder]] = []
        while heap and heap[0][0] <= now and len(live) <= count:
            entry = heapq.heappop(heap)
            if orders.get(entry[4].order_id.int) is entry[4]:  # not stale (closed, or replaced by an amend)
                live.append(entry)
        for entry in live:
            heapq.heappush(heap, entry)
        return len(live) > count

    def depth(self, levels: int) -> tuple[list[DepthLevel], list[DepthLevel]]:
        """Up to ``levels`` aggregated levels per side: bids by price descending, asks ascending."""
        bids = [self._aggregate(p, self._bids[p]) for p in reversed(self._bid_keys[-levels:])] if levels > 0 else []
        asks = [self._aggregate(-k, self._asks[-k]) for k in reversed(self._ask_keys[-levels:])] if levels > 0 else []
        return bids, asks

    @staticmethod
    def _aggregate(price: int, level: _Level) -> DepthLevel:
        return price, sum(o.remaining for o in level.orders), level.live  # dead entries have remaining 0

    def resting_orders(self) -> list[RestingOrder]:
        """Copies of all resting orders in canonical order: bids by price descending then priority, then asks by
        price ascending then priority."""
        out: list[RestingOrder] = []
        for p in reversed(self._bid_keys):
            out.extend(_copy(o) for o in self._bids[p].orders if o.remaining)
        for k in reversed(self._ask_keys):
            out.extend(_copy(o) for o in self._asks[-k].orders if o.remaining)
        return out

    def state_hash(self) -> str:
        """Deterministic sha256 hex digest of the symbol and the canonical resting state (see ``hashing``)."""
        return hash_resting(self.symbol, self.resting_orders())

    # ------------------------------------------------------------------------------------------------- apply

    def apply(self, command: Command, now: Micros) -> list[Event]:
        """Apply one command at time ``now`` and return its events (see the module docstring for their order)."""
        if type(command) is Place:
            return self._place(command.seq, command.order, now)
        if type(command) is Cancel:
            return self._cancel(command.seq, command.order_id, now)
        if type(command) is Amend:
            return self._amend(command, now)
        if type(command) is ExpireDue:
            return self._expire_due(command.seq, now, command.limit)
        raise TypeError(f"not a command: {command!r}")

    def _place(self, seq: int, spec: OrderSpec, now: Micros) -> list[Event]:
        oid = spec.order_id
        if spec.symbol != self.symbol:
            return [Rejected(seq, oid, RejectReason.WRONG_SYMBOL)]
        if oid.int in self._orders:
            return [Rejected(seq, oid, RejectReason.DUPLICATE_ORDER_ID)]
        quantity = spec.quantity
        price = spec.price
        tif = spec.time_in_force
        # Fast path for the common valid GTC limit; anything else goes through the full validation.
        if not (
            tif is _GTC
            and spec.order_type is _LIMIT
            and type(price) is int
            and price > 0
            and type(quantity) is int
            and quantity > 0
            and spec.valid_until is None
        ):
            reason = _place_reject_reason(spec)
            if reason is not None:
                return [Rejected(seq, oid, reason)]
        events: list[Event] = [_accepted(seq, oid)]
        # Any order may be applied after its deadline (a late commit, a matcher behind, a lost wake-up that the
        # sweeper recovers); validation left a valid_until only on GTD, IOC and FOK orders, and none trades past it.
        valid_until = spec.valid_until
        if valid_until is not None and valid_until <= now:
            events.append(_closed(seq, oid, _EXPIRED, quantity))
            return events
        side = spec.side
        if tif == _FOK and not self._fok_feasible(spec, now):
            events.append(_closed(seq, oid, _UNFILLED, quantity))
            return events
        remaining = quantity
        # Only enter the matching loop when the opposite best crosses: the common passive order skips it.
        if side == _BID:
            keys = self._ask_keys
            crosses = bool(keys) and (price is None or -keys[-1] <= price)
        else:
            keys = self._bid_keys
            crosses = bool(keys) and (price is None or keys[-1] >= price)
        if crosses:
            remaining, quantity, closed, capped = self._match(
                seq, now, oid, spec.broker_id, spec.document_number, side, price, quantity, remaining, spec.stp,
                events,
            )  # fmt: skip
            if closed:
                return events
            if capped:
                resting = price is not None and tif in (_GTC, _GTD)
                events.append(_closed(seq, oid, _MATCH_LIMIT if resting else _UNFILLED, remaining))
                return events
        if remaining == 0:
            events.append(_closed(seq, oid, _FILLED, 0))
        elif price is not None and tif in (_GTC, _GTD):
            self._add(
                RestingOrder(
                    oid, spec.broker_id, spec.document_number, side, price, quantity, remaining, seq,
                    spec.valid_until, spec.stp,
                )
            )  # fmt: skip
            events.append(_rested(seq, oid, side, price, remaining))
        else:
            events.append(_closed(seq, oid, _UNFILLED, remaining))
        return events

    def _cancel(self, seq: int, order_id: OrderId, now: Micros) -> list[Event]:
        o = self._orders.get(order_id.int)
        if o is None:
            return [Rejected(seq, order_id, RejectReason.UNKNOWN_ORDER)]
        remaining = o.remaining
        self._remove(o)
        # An order past its valid_until had already expired (an amend says NOT_AMENDABLE, matching would close it
        # EXPIRED): its close reason must not depend on whether ExpireDue ran before the cancel.
        vu = o.valid_until
        return [_closed(seq, order_id, _EXPIRED if vu is not None and vu <= now else _CANCELLED, remaining)]

    def _amend(self, cmd: Amend, now: Micros) -> list[Event]:
        seq = cmd.seq
        oid = cmd.order_id
        o = self._orders.get(oid.int)
        if o is None:
            return [Rejected(seq, oid, RejectReason.UNKNOWN_ORDER)]
        new_quantity = o.quantity if cmd.quantity is None else cmd.quantity
        if type(new_quantity) is not int or new_quantity <= 0:
            return [Rejected(seq, oid, RejectReason.INVALID_QUANTITY)]
        new_price = o.price if cmd.price is None else cmd.price
        if type(new_price) is not int or new_price <= 0:
            return [Rejected(seq, oid, RejectReason.INVALID_PRICE)]
        filled = o.quantity - o.remaining
        if new_quantity <= filled or (o.valid_until is not None and o.valid_until <= now):
            return [Rejected(seq, oid, RejectReason.NOT_AMENDABLE)]
        remaining = new_quantity - filled
        if new_price == o.price and new_quantity <= o.quantity:
            o.quantity = new_quantity
            o.remaining = remaining
            return [Amended(seq, oid, new_price, new_quantity, remaining, True)]
        self._remove(o)
        events: list[Event] = [Amended(seq, oid, new_price, new_quantity, remaining, False)]
        side = o.side
        if side == _BID:
            keys = self._ask_keys
            crosses = bool(keys) and -keys[-1] <= new_price
        else:
            keys = self._bid_keys
            crosses = bool(keys) and keys[-1] >= new_price
        if crosses:
            remaining, new_quantity, closed, capped = self._match(
                seq, now, oid, o.broker_id, o.document_number, side, new_price, new_quantity, remaining, o.stp,
                events,
            )  # fmt: skip
            if closed:
                return events
            if capped:  # a resting (GTC/GTD) order: it must not rest crossing the book
                events.append(_closed(seq, oid, _MATCH_LIMIT, remaining))
                return events
            if remaining == 0:
                events.append(_closed(seq, oid, _FILLED, 0))
                return events
        self._add(
            RestingOrder(
                oid, o.broker_id, o.document_number, side, new_price, new_quantity, remaining, seq,
                o.valid_until, o.stp,
            )
        )  # fmt: skip
        if crosses:
            events.append(_rested(seq, oid, side, new_price, remaining))
        return events

    def _expire_due(self, seq: int, now: Micros, limit: int | None) -> list[Event]:
        heap = self._expiry
        orders = self._orders
        due: list[RestingOrder] = []
        room = len(heap) if limit is None else max(limit, 0)  # len(heap): more than there can be due
        while room and heap and heap[0][0] <= now:
            o = heapq.heappop(heap)[4]
            if orders.get(o.order_id.int) is o:  # stale entries: order closed or replaced by an amend
                due.append(o)
                room -= 1
        due.sort(key=lambda o: (o.priority, o.order_id))
        events: list[Event] = []
        for o in due:
            events.append(_closed(seq, o.order_id, _EXPIRED, o.remaining))
            self._remove(o)
        return events

    # --------------------------------------------------------------------------------------------- internals

    def _add(self, o: RestingOrder) -> None:
        """Append a live order at the back of its level."""
        price = o.price
        if o.side == _BID:
            levels, keys, key = self._bids, self._bid_keys, price
        else:
            levels, keys, key = self._asks, self._ask_keys, -price
        level = levels.get(price)
        if level is None:
            level = levels[price] = _Level()
            insort(keys, key)
        queue = level.orders
        if not queue or queue[-1].priority < o.priority:
            queue.append(o)
        else:
            # A command whose transaction committed late arrives after commands with higher seq: FIFO is by seq
            # (DESIGN §4), so it goes in front of them, exactly where a rebuild from Postgres would put it.
            at = len(queue)
            while at > 0 and queue[at - 1].priority > o.priority:
                at -= 1
            queue.insert(at, o)
        level.live += 1
        self._orders[o.order_id.int] = o
        if o.valid_until is not None:
            self._expiry_counter += 1
            heapq.heappush(self._expiry, (o.valid_until, o.priority, o.order_id.int, self._expiry_counter, o))
            if len(self._expiry) > 2 * len(self._orders) + 64:
                self._compact_expiry()

    def _remove(self, o: RestingOrder) -> None:
        """Take a live order out of the book from anywhere in its level (lazy deletion)."""
        price = o.price
        if o.side == _BID:
            levels, keys, key = self._bids, self._bid_keys, price
        else:
            levels, keys, key = self._asks, self._ask_keys, -price
        del self._orders[o.order_id.int]
        o.remaining = 0  # marks the entry dead; the level's deque drops it when reached
        level = levels[price]
        level.live -= 1
        if level.live == 0:
            del levels[price]
            if keys[-1] == key:
                keys.pop()
            else:
                keys.remove(key)
        elif len(level.orders) > 2 * level.live + 16:
            level.orders = deque(x for x in level.orders if x.remaining)

    def _compact_expiry(self) -> None:
        orders = self._orders
        self._expiry = [e for e in self._expiry if orders.get(e[4].order_id.int) is e[4]]
        heapq.heapify(self._expiry)

    def _fok_feasible(self, spec: OrderSpec, now: Micros) -> bool:
        """Whether a FOK could trade its whole quantity now; reads the book without changing it (rule in the
        module docstring)."""
        need = spec.quantity
        limit = spec.price
        stp = spec.stp
        broker = spec.broker_id
        doc = spec.document_number
        is_bid = spec.side == _BID
        room = self.max_taker_matches  # so the walk visits at most this many live makers, as matching would
        if is_bid:
            levels, prices = self._asks, [-k for k in reversed(self._ask_keys)]
        else:
            levels, prices = self._bids, list(reversed(self._bid_keys))
        for price in prices:
            if limit is not None and (price > limit if is_bid else price < limit):
                return False
            for m in levels[price].orders:
                if not m.remaining:
                    continue
                if m.valid_until is not None and m.valid_until <= now:
                    continue
                if not room:
                    return False  # matching would stop at the cap here, short of the whole quantity
                room -= 1
                if stp != _STP_NONE and m.broker_id == broker and m.document_number == doc:
                    if stp == _CANCEL_OLDEST:
                        continue
                    return False
                need -= m.remaining
                if need <= 0:
                    return True
        return False

    def _match(
        self,
        seq: int,
        now: Micros,
        taker_id: OrderId,
        taker_broker: BrokerId,
        taker_doc: str,
        side: Side,
        limit: int | None,
        quantity: int,
        remaining: int,
        stp: StpMode,
        events: list[Event],
    ) -> tuple[int, int, bool, bool]:
        """Match a taker against the opposite side. Returns ``(remaining, quantity, closed, capped)``: the taker's
        remaining and total quantity afterwards (``decrement`` can lower both), whether STP closed it (its
        ``Closed`` already emitted), and whether it stopped at the match cap with a live crossing maker left (its
        terminal event is then the caller's). Mutates makers and levels; appends events in the documented order."""
        orders = self._orders
        if side == _BID:
            levels, keys, sign = self._asks, self._ask_keys, -1
        else:
            levels, keys, sign = self._bids, self._bid_keys, 1
        check_self = stp != _STP_NONE
        match_no = 0
        room = self.max_taker_matches
        closed = capped = False
        while keys and remaining:
            level_price = keys[-1] * sign
            if limit is not None and (level_price > limit if side == _BID else level_price < limit):
                break
            # Seller's price: a bid taker pays the resting ask; a limit ask taker sells at its own limit.
            fill_price = level_price if side == _BID or limit is None else limit
            level = levels[level_price]
            q = level.orders
            while q and remaining:
                m = q[0]
                m_remaining = m.remaining
                if not m_remaining:  # lazily deleted
                    q.popleft()
                    continue
                vu = m.valid_until
                if vu is not None and vu <= now:
                    q.popleft()
                    level.live -= 1
                    del orders[m.order_id.int]
                    m.remaining = 0
                    events.append(_closed(seq, m.order_id, _EXPIRED, m_remaining))
                    continue
                if not room:
                    capped = True
                    break
                room -= 1  # a fill or an STP step: each costs a maker update and a webhook event
                if check_self and m.broker_id == taker_broker and m.document_number == taker_doc:
                    if stp == _CANCEL_NEWEST:
                        events.append(_closed(seq, taker_id, _SELF_TRADE, remaining))
                        closed = True
                        break
                    if stp in (_CANCEL_OLDEST, _CANCEL_BOTH):
                        q.popleft()
                        level.live -= 1
                        del orders[m.order_id.int]
                        m.remaining = 0
                        events.append(_closed(seq, m.order_id, _SELF_TRADE, m_remaining))
                        if stp == _CANCEL_BOTH:
                            events.append(_closed(seq, taker_id, _SELF_TRADE, remaining))
                            closed = True
                            break
                        continue
                    # decrement: both shrink by d without a trade
                    d = remaining if remaining < m_remaining else m_remaining
                    if m_remaining == d:
                        q.popleft()
                        level.live -= 1
                        del orders[m.order_id.int]
                        m.remaining = 0
                        events.append(_closed(seq, m.order_id, _SELF_TRADE, d))
                    else:
                        m.remaining = m_remaining - d
                        m.quantity -= d
                        events.append(Decremented(seq, m.order_id, m.quantity, m.remaining))
                    if remaining == d:
                        events.append(_closed(seq, taker_id, _SELF_TRADE, d))
                        closed = True
                        break
                    remaining -= d
                    quantity -= d
                    events.append(Decremented(seq, taker_id, quantity, remaining))
                    continue
                qty = remaining if remaining < m_remaining else m_remaining
                remaining -= qty
                m_remaining -= qty
                m.remaining = m_remaining
                events.append(
                    _fill(
                        seq, match_no, fill_price, qty, m.order_id, m.broker_id, m_remaining, taker_id,
                        taker_broker, remaining, side,
                    )
                )  # fmt: skip
                match_no += 1
                if not m_remaining:
                    q.popleft()
                    level.live -= 1
                    del orders[m.order_id.int]
                    events.append(_closed(seq, m.order_id, _FILLED, 0))
            if level.live == 0:
                del levels[level_price]
                keys.pop()
            if closed or capped:
                break
        return remaining, quantity, closed, capped
