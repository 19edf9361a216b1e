"""The database itself rejects rows that break the schema's invariants, whatever code writes them.

Every test runs inside a transaction on the shared migrated database and rolls it back; each rejected
statement runs in a savepoint, and the test checks the *name* of the constraint that fired, so a row
rejected for another reason does not pass by accident.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Executable, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from exchange.db.tables import brokers, commands, orders, trades, webhook_attempts, webhook_events

MAX_BIGINT = 2**63 - 1


@pytest.fixture
def conn(migrated_engine: Engine) -> Iterator[Connection]:
    with migrated_engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


def _violation(conn: Connection, statement: Executable, params: Any = None) -> DBAPIError:
    with pytest.raises(DBAPIError) as excinfo, conn.begin_nested():
        conn.execute(statement, params)
    return excinfo.value


def assert_rejected_by(conn: Connection, constraint: str, statement: Executable, params: Any = None) -> None:
    error = _violation(conn, statement, params)
    assert error.orig is not None
    assert error.orig.diag.constraint_name == constraint, error.orig


def new_broker(conn: Connection, **values: Any) -> uuid.UUID:
    row = {
        "name": "Broker",
        "api_key_hash": hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        "webhook_secret": "whsec_c2VjcmV0",
        **values,
    }
    broker_id: uuid.UUID = conn.execute(insert(brokers).values(**row).returning(brokers.c.id)).scalar_one()
    return broker_id


def order_row(broker_id: uuid.UUID, **values: Any) -> dict[str, Any]:
    return {
        "broker_id": broker_id,
        "document_number": "12345678900",
        "symbol": "PETR4",
        "side": "bid",
        "order_type": "limit",
        "time_in_force": "gtc",
        "price": 1000,
        "quantity": 100,
        "remaining": 100,
        "seq": 1,
        **values,
    }


def new_order(conn: Connection, broker_id: uuid.UUID, **values: Any) -> uuid.UUID:
    order_id: uuid.UUID = conn.execute(
        insert(orders).values(**order_row(broker_id, **values)).returning(orders.c.id)
    ).scalar_one()
    return order_id


def insert_order(broker_id: uuid.UUID, **values: Any) -> Executable:
    return insert(orders).values(**order_row(broker_id, **values))


@pytest.fixture
def broker(conn: Connection) -> uuid.UUID:
    return new_broker(conn)


# ------------------------------------------------------------------------------------------------- orders


def test_valid_pending_limit_order_is_accepted(conn: Connection, broker: uuid.UUID) -> None:
    order_id = new_order(conn, broker)

    row = conn.execute(select(orders.c.status, orders.c.stp).where(orders.c.id == order_id)).one()
    assert tuple(row) == ("pending", "none")


@pytest.mark.parametrize("quantity", [0, -1])
def test_order_quantity_must_be_positive(conn: Connection, broker: uuid.UUID, quantity: int) -> None:
    assert_rejected_by(conn, "ck_orders_quantity_positive", insert_order(broker, quantity=quantity, remaining=0))


@pytest.mark.parametrize("price", [0, -1])
def test_order_price_must_be_positive(conn: Connection, broker: uuid.UUID, price: int) -> None:
    assert_rejected_by(conn, "ck_orders_price_positive", insert_order(broker, price=price))


def test_order_remaining_cannot_exceed_quantity(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_remaining_within_quantity", insert_order(broker, quantity=10, remaining=11))


def test_order_remaining_cannot_be_negative(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_remaining_within_quantity", insert_order(broker, remaining=-1))


def test_limit_order_requires_a_price(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_price_matches_order_type", insert_order(broker, price=None))


def test_market_order_must_not_have_a_price(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(
        conn, "ck_orders_price_matches_order_type", insert_order(broker, order_type="market", price=1000)
    )


def test_market_order_without_price_is_accepted(conn: Connection, broker: uuid.UUID) -> None:
    new_order(conn, broker, order_type="market", price=None, time_in_force="ioc")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("status", "cancelled"),
        ("side", "buy"),
        ("order_type", "stop"),
        ("time_in_force", "day"),
        ("stp", "reject"),
    ],
)
def test_order_enumerated_column_rejects_unknown_value(
    conn: Connection, broker: uuid.UUID, column: str, value: str
) -> None:
    assert_rejected_by(conn, f"ck_orders_{column}", insert_order(broker, **{column: value}))


def test_order_close_reason_rejects_unknown_value(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_close_reason", insert_order(broker, status="closed", close_reason="vanished"))


def test_closed_order_requires_a_close_reason(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_closed_has_reason", insert_order(broker, status="closed"))


def test_open_order_must_not_have_a_close_reason(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(
        conn,
        "ck_orders_closed_has_reason",
        insert_order(broker, status="open", priority=1, close_reason="cancelled"),
    )


def test_open_order_requires_a_priority(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_open_is_restable", insert_order(broker, status="open"))


def test_open_order_requires_remaining_quantity(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_open_is_restable", insert_order(broker, status="open", priority=1, remaining=0))


def test_filled_order_has_no_remaining_quantity(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(
        conn,
        "ck_orders_filled_has_no_remaining",
        insert_order(broker, status="closed", close_reason="filled", remaining=1),
    )


def test_order_symbol_must_be_upper_case(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_symbol_format", insert_order(broker, symbol="petr4"))


def test_order_symbol_is_at_most_ten_characters(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_symbol_format", insert_order(broker, symbol="ABCDEFGHIJK"))


def test_order_document_number_is_at_most_twenty_characters(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_orders_document_number_length", insert_order(broker, document_number="1" * 21))


def test_client_order_id_is_unique_per_broker(conn: Connection, broker: uuid.UUID) -> None:
    new_order(conn, broker, client_order_id="abc-1")

    assert_rejected_by(
        conn, "uq_orders_broker_id_client_order_id", insert_order(broker, client_order_id="abc-1", seq=2)
    )


def test_client_order_id_may_repeat_across_brokers(conn: Connection, broker: uuid.UUID) -> None:
    new_order(conn, broker, client_order_id="abc-1")

    new_order(conn, new_broker(conn), client_order_id="abc-1", seq=2)


def test_orders_without_client_order_id_do_not_collide(conn: Connection, broker: uuid.UUID) -> None:
    new_order(conn, broker)

    new_order(conn, broker, seq=2)


def test_idempotency_key_is_unique_per_broker(conn: Connection, broker: uuid.UUID) -> None:
    new_order(conn, broker, idempotency_key="key-1")

    assert_rejected_by(
        conn, "uq_orders_broker_id_idempotency_key", insert_order(broker, idempotency_key="key-1", seq=2)
    )


def test_order_requires_an_existing_broker(conn: Connection) -> None:
    assert_rejected_by(conn, "fk_orders_broker_id_brokers", insert_order(uuid.uuid4()))


# ------------------------------------------------------------------------------------------------ brokers


def test_broker_api_key_hash_must_be_sha256_hex(conn: Connection) -> None:
    error = _violation(
        conn,
        insert(brokers).values(name="B", api_key_hash="not-a-hash", webhook_secret="whsec_eA=="),
    )
    assert error.orig is not None
    assert error.orig.diag.constraint_name == "ck_brokers_api_key_hash_sha256_hex"


def test_broker_api_key_hash_is_unique(conn: Connection) -> None:
    digest = hashlib.sha256(b"key").hexdigest()
    new_broker(conn, api_key_hash=digest)

    assert_rejected_by(
        conn,
        "uq_brokers_api_key_hash",
        insert(brokers).values(name="B", api_key_hash=digest, webhook_secret="whsec_eA=="),
    )


def test_broker_webhook_secret_must_be_a_whsec_string(conn: Connection) -> None:
    assert_rejected_by(
        conn,
        "ck_brokers_webhook_secret_format",
        insert(brokers).values(name="B", api_key_hash=hashlib.sha256(b"k").hexdigest(), webhook_secret="plain-secret"),
    )


def test_broker_previous_webhook_secret_requires_an_expiry(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(
        conn,
        "ck_brokers_webhook_secret_previous_expiry",
        update(brokers).where(brokers.c.id == broker).values(webhook_secret_previous="whsec_b2xk"),
    )


def test_broker_name_must_not_be_empty(conn: Connection) -> None:
    assert_rejected_by(
        conn,
        "ck_brokers_name_length",
        insert(brokers).values(name="", api_key_hash=hashlib.sha256(b"k").hexdigest(), webhook_secret="whsec_x"),
    )


# ------------------------------------------------------------------------------------------- money limits


@pytest.mark.parametrize("value", [MAX_BIGINT, -MAX_BIGINT - 1])
def test_broker_balance_holds_the_full_bigint_range(conn: Connection, value: int) -> None:
    broker_id = new_broker(conn, balance=value)

    assert conn.execute(select(brokers.c.balance).where(brokers.c.id == broker_id)).scalar_one() == value


def test_broker_balance_rejects_two_to_the_63(conn: Connection, broker: uuid.UUID) -> None:
    error = _violation(conn, update(brokers).where(brokers.c.id == broker).values(balance=2**63))

    assert error.orig is not None
    assert error.orig.sqlstate == "22003"  # numeric_value_out_of_range


@pytest.mark.parametrize("column", ["price", "quantity"])
def test_order_money_columns_accept_max_bigint(conn: Connection, broker: uuid.UUID, column: str) -> None:
    values = {column: MAX_BIGINT, "remaining": 1} if column == "price" else {column: MAX_BIGINT}
    order_id = new_order(conn, broker, **values)

    assert conn.execute(select(orders.c[column]).where(orders.c.id == order_id)).scalar_one() == MAX_BIGINT


@pytest.mark.parametrize("column", ["price", "quantity"])
def test_order_money_columns_reject_two_to_the_63(conn: Connection, broker: uuid.UUID, column: str) -> None:
    error = _violation(conn, insert_order(broker, **{column: 2**63}))

    assert error.orig is not None
    assert error.orig.sqlstate == "22003"  # numeric_value_out_of_range


# ----------------------------------------------------------------------------------------------- commands


def test_command_seq_comes_from_the_command_sequence_in_insert_order(conn: Connection, broker: uuid.UUID) -> None:
    order_id = new_order(conn, broker)
    statement = insert(commands).values(symbol="PETR4", kind="place", order_id=order_id).returning(commands.c.seq)

    first = conn.execute(statement).scalar_one()
    second = conn.execute(statement).scalar_one()

    assert second > first


def test_command_kind_rejects_unknown_value(conn: Connection, broker: uuid.UUID) -> None:
    order_id = new_order(conn, broker)

    assert_rejected_by(
        conn, "ck_commands_kind", insert(commands).values(symbol="PETR4", kind="modify", order_id=order_id)
    )


def test_cancel_command_requires_an_order(conn: Connection) -> None:
    assert_rejected_by(conn, "ck_commands_order_id_required", insert(commands).values(symbol="PETR4", kind="cancel"))


def test_expire_command_needs_no_order(conn: Connection) -> None:
    conn.execute(insert(commands).values(symbol="PETR4", kind="expire"))


def test_amend_command_requires_a_payload(conn: Connection, broker: uuid.UUID) -> None:
    order_id = new_order(conn, broker)

    assert_rejected_by(
        conn,
        "ck_commands_amend_has_payload",
        insert(commands).values(symbol="PETR4", kind="amend", order_id=order_id),
    )


@pytest.mark.parametrize(("kind", "payload"), [("place", None), ("cancel", None), ("amend", {"quantity": 5})])
def test_command_order_must_be_an_order_of_the_commands_symbol(
    conn: Connection, broker: uuid.UUID, kind: str, payload: dict[str, int] | None
) -> None:
    order_id = new_order(conn, broker, symbol="VALE3")

    assert_rejected_by(
        conn,
        "fk_commands_order_id_orders",
        insert(commands).values(symbol="PETR4", kind=kind, order_id=order_id, payload=payload),
    )


def test_command_of_its_orders_symbol_is_accepted(conn: Connection, broker: uuid.UUID) -> None:
    order_id = new_order(conn, broker, symbol="VALE3")

    conn.execute(insert(commands).values(symbol="VALE3", kind="cancel", order_id=order_id))


def test_command_cannot_move_to_another_symbol(conn: Connection, broker: uuid.UUID) -> None:
    order_id = new_order(conn, broker)
    seq = conn.execute(
        insert(commands).values(symbol="PETR4", kind="cancel", order_id=order_id).returning(commands.c.seq)
    ).scalar_one()

    assert_rejected_by(
        conn, "fk_commands_order_id_orders", update(commands).where(commands.c.seq == seq).values(symbol="VALE3")
    )


# ------------------------------------------------------------------------------------------------- trades


def _trade(conn: Connection, **values: Any) -> dict[str, Any]:
    buyer, seller = new_broker(conn), new_broker(conn)
    buy = new_order(conn, buyer, side="bid")
    sell = new_order(conn, seller, side="ask", seq=2)
    return {
        "symbol": "PETR4",
        "price": 1000,
        "quantity": 10,
        "buy_order_id": buy,
        "sell_order_id": sell,
        "buy_broker_id": buyer,
        "sell_broker_id": seller,
        "maker_order_id": buy,
        "taker_side": "ask",
        # A sequence number no other test's trade has (the migrated database is shared).
        "command_seq": conn.execute(text("SELECT nextval('command_seq')")).scalar_one(),
        "match_no": 0,
        **values,
    }


def test_trade_is_booked_once_per_command_and_match_number(conn: Connection) -> None:
    row = _trade(conn)
    conn.execute(insert(trades).values(**row))

    assert_rejected_by(conn, "uq_trades_command_seq_match_no", insert(trades).values(**row))


@pytest.mark.parametrize(("column", "constraint"), [("price", "price_positive"), ("quantity", "quantity_positive")])
def test_trade_price_and_quantity_must_be_positive(conn: Connection, column: str, constraint: str) -> None:
    assert_rejected_by(conn, f"ck_trades_{constraint}", insert(trades).values(**_trade(conn, **{column: 0})))


def test_trade_maker_must_be_one_of_its_orders(conn: Connection) -> None:
    assert_rejected_by(
        conn, "ck_trades_maker_is_a_side", insert(trades).values(**_trade(conn, maker_order_id=uuid.uuid4()))
    )


@pytest.mark.parametrize("side", ["buy", "sell"])
def test_trade_order_must_be_an_order_of_the_trades_symbol(conn: Connection, side: str) -> None:
    row = _trade(conn)
    other_symbol = new_order(conn, row[f"{side}_broker_id"], symbol="VALE3", seq=3)

    assert_rejected_by(
        conn,
        f"fk_trades_{side}_order_id_orders",
        insert(trades).values(**{**row, f"{side}_order_id": other_symbol, "maker_order_id": other_symbol}),
    )


@pytest.mark.parametrize("side", ["buy", "sell"])
def test_trade_broker_must_be_its_orders_broker(conn: Connection, side: str) -> None:
    row = _trade(conn)

    assert_rejected_by(
        conn,
        f"fk_trades_{side}_order_id_orders",
        insert(trades).values(**{**row, f"{side}_broker_id": new_broker(conn)}),
    )


def test_trade_broker_must_exist(conn: Connection) -> None:
    assert_rejected_by(
        conn, "fk_trades_sell_order_id_orders", insert(trades).values(**_trade(conn, sell_broker_id=uuid.uuid4()))
    )


def test_traded_order_cannot_move_to_another_symbol(conn: Connection) -> None:
    row = _trade(conn)
    conn.execute(insert(trades).values(**row))

    assert_rejected_by(
        conn,
        "fk_trades_buy_order_id_orders",
        update(orders).where(orders.c.id == row["buy_order_id"]).values(symbol="VALE3"),
    )


# ----------------------------------------------------------------------------------------- webhook outbox


def _event(broker_id: uuid.UUID, sequence: int, **values: Any) -> Executable:
    return insert(webhook_events).values(
        broker_id=broker_id, sequence=sequence, type="order.fill", payload={"event": "order.fill"}, **values
    )


def test_outbox_sequence_is_unique_per_broker(conn: Connection, broker: uuid.UUID) -> None:
    conn.execute(_event(broker, 1))

    assert_rejected_by(conn, "uq_webhook_events_broker_id_sequence", _event(broker, 1))


def test_outbox_sequence_may_repeat_across_brokers(conn: Connection, broker: uuid.UUID) -> None:
    conn.execute(_event(broker, 1))

    conn.execute(_event(new_broker(conn), 1))


def test_outbox_status_rejects_unknown_value(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_webhook_events_status", _event(broker, 1, status="sent"))


def test_delivered_event_requires_a_delivery_time(conn: Connection, broker: uuid.UUID) -> None:
    assert_rejected_by(conn, "ck_webhook_events_delivered_has_time", _event(broker, 1, status="delivered"))


def test_deleting_an_event_deletes_its_attempts(conn: Connection, broker: uuid.UUID) -> None:
    event_id = conn.execute(_event(broker, 1).returning(webhook_events.c.id)).scalar_one()
    conn.execute(insert(webhook_attempts).values(event_id=event_id, broker_id=broker, url="https://example.com/hook"))

    conn.execute(webhook_events.delete().where(webhook_events.c.id == event_id))

    remaining = conn.execute(select(webhook_attempts.c.id).where(webhook_attempts.c.event_id == event_id)).all()
    assert remaining == []


def test_attempt_broker_must_be_its_events_broker(conn: Connection, broker: uuid.UUID) -> None:
    event_id = conn.execute(_event(broker, 1).returning(webhook_events.c.id)).scalar_one()

    assert_rejected_by(
        conn,
        "fk_webhook_attempts_event_id_webhook_events",
        insert(webhook_attempts).values(event_id=event_id, broker_id=new_broker(conn), url="https://example.com/h"),
    )
