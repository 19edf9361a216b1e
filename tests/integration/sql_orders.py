"""Accepting orders straight through SQL, exactly as the api's accept path writes them (order row + place command
in one transaction), for tests of the matcher and the sweeper that must not depend on the HTTP layer."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

from sqlalchemy import Engine, text


def add_broker(engine: Engine, name: str) -> uuid.UUID:
    broker_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO brokers (id, name, api_key_hash, webhook_secret) VALUES (:id, :name, :h, 'whsec_x')"),
            {"id": broker_id, "name": name, "h": hashlib.sha256(name.encode()).hexdigest()},
        )
    return broker_id


def place(
    engine: Engine,
    broker_id: uuid.UUID,
    symbol: str,
    side: str,
    quantity: int,
    price: int | None,
    *,
    tif: str | None = None,
    valid_until: datetime | None = None,
    document_number: str = "123",
) -> uuid.UUID:
    """Accept an order the way the api does: order row + place command in one transaction."""
    order_id = uuid.uuid4()
    order_type = "limit" if price is not None else "market"
    tif = tif or ("ioc" if price is None else ("gtd" if valid_until else "gtc"))
    with engine.begin() as conn:
        seq = conn.execute(text("SELECT nextval('command_seq')")).scalar_one()
        conn.execute(
            text(
                "INSERT INTO orders (id, broker_id, document_number, symbol, side, order_type, time_in_force, "
                "price, quantity, remaining, valid_until, seq) VALUES (:id, :b, :doc, :s, :side, :ot, :tif, :p, :q, "
                ":q, :vu, :seq)"
            ),
            {
                "id": order_id,
                "b": broker_id,
                "doc": document_number,
                "s": symbol,
                "side": side,
                "ot": order_type,
                "tif": tif,
                "p": price,
                "q": quantity,
                "vu": valid_until,
                "seq": seq,
            },
        )
        conn.execute(
            text("INSERT INTO commands (seq, symbol, kind, order_id) VALUES (:seq, :s, 'place', :id)"),
            {"seq": seq, "s": symbol, "id": order_id},
        )
    return order_id


def cancel(engine: Engine, symbol: str, order_id: uuid.UUID) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO commands (symbol, kind, order_id) VALUES (:s, 'cancel', :id)"),
            {"s": symbol, "id": order_id},
        )


def crossing_pair(engine: Engine, symbol: str) -> uuid.UUID:
    """An ask and a bid that cross, both pending for the matcher, whose trade updates both brokers' rows; returns
    the seller."""
    seller, buyer = add_broker(engine, f"seller-{symbol}"), add_broker(engine, f"buyer-{symbol}")
    place(engine, seller, symbol, "ask", 1, 100)
    place(engine, buyer, symbol, "bid", 1, 100)
    return seller


def trades(engine: Engine, symbol: str) -> int:
    """How many trades ``symbol`` has."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM trades WHERE symbol = :s"), {"s": symbol}).scalar_one())


def rest_crossed_pair(engine: Engine, symbol: str, buyer: uuid.UUID, seller: uuid.UUID) -> uuid.UUID:
    """Rows no book can hold, left as if by a bug: a bid at 200 resting above an ask at 100 on ``symbol``. Every
    rebuild of its book fails (a failure of the symbol's own, not the database's) until the bid, whose id is
    returned, is closed (:func:`close_order`)."""
    with engine.begin() as conn:
        rows = [
            conn.execute(
                text(
                    "INSERT INTO orders (broker_id, document_number, symbol, side, order_type, time_in_force, price, "
                    "quantity, remaining, status, seq, priority) VALUES (:b, '1', :s, :side, 'limit', 'gtc', :p, 1, "
                    "1, 'open', nextval('command_seq'), currval('command_seq')) RETURNING id"
                ),
                {"b": broker_id, "s": symbol, "side": side, "p": price},
            ).scalar_one()
            for broker_id, side, price in ((buyer, "bid", 200), (seller, "ask", 100))
        ]
    bid: uuid.UUID = rows[0]
    return bid


def close_order(engine: Engine, order_id: uuid.UUID) -> None:
    """Close ``order_id`` behind the matcher's back (mends what :func:`rest_crossed_pair` broke)."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE orders SET status = 'closed', close_reason = 'cancelled' WHERE id = :id"), {"id": order_id}
        )
