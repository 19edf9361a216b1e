"""A deliberately naive reference implementation of the matching rules, for differential testing only.

It shares nothing with :mod:`exchange.engine.book` except the value types and the canonical hash: the book is a
plain list of orders, the best counterparty is found by ``sorted()`` over the whole list for every single match,
and FOK feasibility is decided by *simulating* the order on a deep copy of the book and checking that the
simulated fills add up to the whole quantity (the fast engine instead walks its levels with a rule). Slow on
purpose; clarity is the point. The rules and the event order are those documented in :mod:`exchange.engine.book`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from exchange.engine.hashing import hash_resting
from exchange.engine.types import (
    MAX_TAKER_MATCHES,
    Accepted,
    Amend,
    Amended,
    BrokerId,
    Cancel,
    Closed,
    CloseReason,
    Command,
    Decremented,
    Event,
    ExpireDue,
    Fill,
    Micros,
    OrderId,
    OrderSpec,
    OrderType,
    Place,
    Rejected,
    RejectReason,
    Rested,
    RestingOrder,
    Side,
    StpMode,
    TimeInForce,
)


@dataclass
class _Taker:
    order_id: OrderId
    broker_id: BrokerId
    document_number: str
    side: Side
    price: int | None  # None: market
    quantity: int
    remaining: int
    stp: StpMode


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_expired(order: RestingOrder, now: Micros) -> bool:
    return order.valid_until is not None and order.valid_until <= now


class ReferenceBook:
    """Same observable behaviour as ``OrderBook`` (events, ``resting_orders``, ``state_hash``), naively."""

    def __init__(self, symbol: str, *, max_taker_matches: int = MAX_TAKER_MATCHES) -> None:
        self.symbol = symbol
        self.orders: list[RestingOrder] = []
        self.max_taker_matches = max_taker_matches

    # ------------------------------------------------------------------------------------------------ queries

    def find(self, order_id: OrderId) -> RestingOrder | None:
        for order in self.orders:
            if order.order_id == order_id:
                return order
        return None

    def resting_orders(self) -> list[RestingOrder]:
        bids = sorted((o for o in self.orders if o.side == Side.BID), key=lambda o: (-o.price, o.priority))
        asks = sorted((o for o in self.orders if o.side == Side.ASK), key=lambda o: (o.price, o.priority))
        return [copy.copy(o) for o in bids + asks]

    def state_hash(self) -> str:
        return hash_resting(self.symbol, self.resting_orders())

    # ------------------------------------------------------------------------------------------------- apply

    def apply(self, command: Command, now: Micros) -> list[Event]:
        if isinstance(command, Place):
            return self.place(command.seq, command.order, now)
        if isinstance(command, Cancel):
            return self.cancel(command.seq, command.order_id, now)
        if isinstance(command, Amend):
            return self.amend(command, now)
        if isinstance(command, ExpireDue):
            return self.expire_due(command.seq, now, command.limit)
        raise TypeError(f"not a command: {command!r}")

    def validate(self, spec: OrderSpec) -> RejectReason | None:
        if spec.symbol != self.symbol:
            return RejectReason.WRONG_SYMBOL
        if self.find(spec.order_id) is not None:
            return RejectReason.DUPLICATE_ORDER_ID
        if not _is_int(spec.quantity) or spec.quantity < 1:
            return RejectReason.INVALID_QUANTITY
        if spec.order_type == OrderType.MARKET:
            if spec.price is not None:
                return RejectReason.INVALID_PRICE
        elif spec.order_type != OrderType.LIMIT or not _is_int(spec.price) or spec.price is None or spec.price < 1:
            return RejectReason.INVALID_PRICE
        allowed = [TimeInForce.IOC, TimeInForce.FOK]
        if spec.order_type == OrderType.LIMIT:
            allowed += [TimeInForce.GTC, TimeInForce.GTD]
        if spec.time_in_force not in allowed:
            return RejectReason.INVALID_TIME_IN_FORCE
        if spec.time_in_force == TimeInForce.GTD and not _is_int(spec.valid_until):
            return RejectReason.INVALID_TIME_IN_FORCE
        if spec.time_in_force == TimeInForce.GTC and spec.valid_until is not None:
            return RejectReason.INVALID_TIME_IN_FORCE
        if spec.valid_until is not None and not _is_int(spec.valid_until):  # optional on IOC/FOK, but an int
            return RejectReason.INVALID_TIME_IN_FORCE
        return None

    def place(self, seq: int, spec: OrderSpec, now: Micros) -> list[Event]:
        reason = self.validate(spec)
        if reason is not None:
            return [Rejected(seq, spec.order_id, reason)]
        events: list[Event] = [Accepted(seq, spec.order_id)]
        if spec.valid_until is not None and spec.valid_until <= now:  # GTD, IOC or FOK past its deadline
            events.append(Closed(seq, spec.order_id, CloseReason.EXPIRED, spec.quantity))
            return events
        taker = _Taker(
            spec.order_id,
            spec.broker_id,
            spec.document_number,
            spec.side,
            spec.price,
            spec.quantity,
            spec.quantity,
            spec.stp,
        )
        if spec.time_in_force == TimeInForce.FOK:
            trial_book = copy.deepcopy(self)
            trial_events: list[Event] = []
            trial_book.match(seq, now, copy.copy(taker), trial_events)
            traded = sum(e.quantity for e in trial_events if isinstance(e, Fill))
            if traded != spec.quantity:
                events.append(Closed(seq, spec.order_id, CloseReason.UNFILLED, spec.quantity))
                return events
        outcome = self.match(seq, now, taker, events)
        if outcome == "closed":
            return events
        if outcome == "capped":
            rests = spec.price is not None and spec.time_in_force in (TimeInForce.GTC, TimeInForce.GTD)
            close = CloseReason.MATCH_LIMIT if rests else CloseReason.UNFILLED
            events.append(Closed(seq, spec.order_id, close, taker.remaining))
            return events
        if taker.remaining == 0:
            events.append(Closed(seq, spec.order_id, CloseReason.FILLED, 0))
        elif spec.price is not None and spec.time_in_force in (TimeInForce.GTC, TimeInForce.GTD):
            self.orders.append(
                RestingOrder(
                    spec.order_id,
                    spec.broker_id,
                    spec.document_number,
                    spec.side,
                    spec.price,
                    taker.quantity,
                    taker.remaining,
                    seq,
                    spec.valid_until,
                    spec.stp,
                )
            )
            events.append(Rested(seq, spec.order_id, spec.side, spec.price, taker.remaining))
        else:
            events.append(Closed(seq, spec.order_id, CloseReason.UNFILLED, taker.remaining))
        return events

    def cancel(self, seq: int, order_id: OrderId, now: Micros) -> list[Event]:
        order = self.find(order_id)
        if order is None:
            return [Rejected(seq, order_id, RejectReason.UNKNOWN_ORDER)]
        self.orders.remove(order)
        reason = CloseReason.EXPIRED if _is_expired(order, now) else CloseReason.CANCELLED
        return [Closed(seq, order_id, reason, order.remaining)]

    def amend(self, cmd: Amend, now: Micros) -> list[Event]:
        order = self.find(cmd.order_id)
        if order is None:
            return [Rejected(cmd.seq, cmd.order_id, RejectReason.UNKNOWN_ORDER)]
        quantity = order.quantity if cmd.quantity is None else cmd.quantity
        price = order.price if cmd.price is None else cmd.price
        if not _is_int(quantity) or quantity < 1:
            return [Rejected(cmd.seq, cmd.order_id, RejectReason.INVALID_QUANTITY)]
        if not _is_int(price) or price < 1:
            return [Rejected(cmd.seq, cmd.order_id, RejectReason.INVALID_PRICE)]
        filled = order.quantity - order.remaining
        if quantity <= filled or _is_expired(order, now):
            return [Rejected(cmd.seq, cmd.order_id, RejectReason.NOT_AMENDABLE)]
        keeps_priority = price == order.price and quantity <= order.quantity
        events: list[Event] = [Amended(cmd.seq, order.order_id, price, quantity, quantity - filled, keeps_priority)]
        if keeps_priority:
            order.quantity = quantity
            order.remaining = quantity - filled
            return events
        self.orders.remove(order)
        taker = _Taker(
            order.order_id,
            order.broker_id,
            order.document_number,
            order.side,
            price,
            quantity,
            quantity - filled,
            order.stp,
        )
        crosses = any(o.side != taker.side and self.crosses(taker, o) for o in self.orders)
        if crosses:
            outcome = self.match(cmd.seq, now, taker, events)
            if outcome == "closed":
                return events
            if outcome == "capped":
                events.append(Closed(cmd.seq, order.order_id, CloseReason.MATCH_LIMIT, taker.remaining))
                return events
            if taker.remaining == 0:
                events.append(Closed(cmd.seq, order.order_id, CloseReason.FILLED, 0))
                return events
        self.orders.append(
            RestingOrder(
                order.order_id,
                order.broker_id,
                order.document_number,
                order.side,
                price,
                taker.quantity,
                taker.remaining,
                cmd.seq,
                order.valid_until,
                order.stp,
            )
        )
        if crosses:
            events.append(Rested(cmd.seq, order.order_id, order.side, price, taker.remaining))
        return events

    def expire_due(self, seq: int, now: Micros, limit: int | None = None) -> list[Event]:
        due = sorted(
            (o for o in self.orders if _is_expired(o, now)), key=lambda o: (o.valid_until, o.priority, o.order_id)
        )[: None if limit is None else max(limit, 0)]
        due.sort(key=lambda o: (o.priority, o.order_id))
        events: list[Event] = []
        for order in due:
            self.orders.remove(order)
            events.append(Closed(seq, order.order_id, CloseReason.EXPIRED, order.remaining))
        return events

    # -------------------------------------------------------------------------------------------- matching

    @staticmethod
    def crosses(taker: _Taker, resting: RestingOrder) -> bool:
        if taker.price is None:
            return True
        if taker.side == Side.BID:
            return resting.price <= taker.price
        return resting.price >= taker.price

    def match(self, seq: int, now: Micros, taker: _Taker, events: list[Event]) -> str:
        """Trade ``taker`` against the book, one best counterparty at a time. Returns ``"closed"`` if STP closed it,
        ``"capped"`` if it had matched ``max_taker_matches`` makers (fills and STP steps) and met one more live
        crossing maker, ``"done"`` otherwise."""
        match_no = 0
        matched = 0
        while taker.remaining > 0:
            candidates = [o for o in self.orders if o.side != taker.side and self.crosses(taker, o)]
            if not candidates:
                return "done"
            if taker.side == Side.BID:
                maker = sorted(candidates, key=lambda o: (o.price, o.priority))[0]
            else:
                maker = sorted(candidates, key=lambda o: (-o.price, o.priority))[0]
            if _is_expired(maker, now):
                self.orders.remove(maker)
                events.append(Closed(seq, maker.order_id, CloseReason.EXPIRED, maker.remaining))
                continue
            if matched == self.max_taker_matches:
                return "capped"
            matched += 1
            is_self = maker.broker_id == taker.broker_id and maker.document_number == taker.document_number
            if is_self and taker.stp != StpMode.NONE:
                if self.prevent_self_trade(seq, taker, maker, events):
                    return "closed"
                continue
            quantity = min(taker.remaining, maker.remaining)
            maker.remaining -= quantity
            taker.remaining -= quantity
            seller_price = maker.price if taker.side == Side.BID or taker.price is None else taker.price
            events.append(
                Fill(
                    seq,
                    match_no,
                    seller_price,
                    quantity,
                    maker.order_id,
                    maker.broker_id,
                    maker.remaining,
                    taker.order_id,
                    taker.broker_id,
                    taker.remaining,
                    taker.side,
                )
            )
            match_no += 1
            if maker.remaining == 0:
                self.orders.remove(maker)
                events.append(Closed(seq, maker.order_id, CloseReason.FILLED, 0))
        return "done"

    def prevent_self_trade(self, seq: int, taker: _Taker, maker: RestingOrder, events: list[Event]) -> bool:
        """Apply the taker's STP mode to one self maker. Returns True if the taker got closed."""
        mode = taker.stp
        if mode == StpMode.CANCEL_NEWEST:
            events.append(Closed(seq, taker.order_id, CloseReason.SELF_TRADE, taker.remaining))
            return True
        if mode in (StpMode.CANCEL_OLDEST, StpMode.CANCEL_BOTH):
            self.orders.remove(maker)
            events.append(Closed(seq, maker.order_id, CloseReason.SELF_TRADE, maker.remaining))
            if mode == StpMode.CANCEL_BOTH:
                events.append(Closed(seq, taker.order_id, CloseReason.SELF_TRADE, taker.remaining))
                return True
            return False
        cut = min(taker.remaining, maker.remaining)
        if maker.remaining == cut:
            self.orders.remove(maker)
            events.append(Closed(seq, maker.order_id, CloseReason.SELF_TRADE, cut))
        else:
            maker.remaining -= cut
            maker.quantity -= cut
            events.append(Decremented(seq, maker.order_id, maker.quantity, maker.remaining))
        if taker.remaining == cut:
            events.append(Closed(seq, taker.order_id, CloseReason.SELF_TRADE, cut))
            return True
        taker.remaining -= cut
        taker.quantity -= cut
        events.append(Decremented(seq, taker.order_id, taker.quantity, taker.remaining))
        return False
