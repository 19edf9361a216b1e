"""Proof tests of defects found in review. Each test FAILS on the code it was written against.

Everything runs against the real PostgreSQL / Redis of the other integration tests.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import Engine, text

from exchange.engine import OrderBook
from exchange.matching import store
from exchange.matching.service import BookCache, process_symbol
from exchange.webhooks.delivery import Outcome
from exchange.webhooks.ssrf import forbidden_reason
from tests.integration.api_helpers import ADMIN_KEY, new_symbol, register
from tests.integration.sql_orders import add_broker, place
from tests.integration.webhook_support import broker_with_endpoint, deliverer, events_of, fills

pytest_plugins = ["tests.integration.api_fixtures"]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _drain(engine: Engine, symbol: str, cache: BookCache | None = None, tries: int = 3) -> None:
    """Run the matcher on ``symbol`` a few times, swallowing errors like dramatiq's retries would."""
    for _ in range(tries):
        try:
            process_symbol(engine, cache or BookCache(), symbol)
        except Exception:  # a wedged symbol raises every time: that is what we detect below
            continue


def _pending_commands(engine: Engine, symbol: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM commands WHERE symbol = :s AND processed_at IS NULL"), {"s": symbol}
            ).scalar_one()
        )


# ----------------------------------------------------------------------------------------------------------
# F1. A trade whose notional (price * quantity) or a balance/position that leaves BIGINT range makes the
#     matcher's transaction fail (22003) on every attempt: the symbol is wedged for every broker forever.


def test_f1_an_overflowing_trade_accepted_by_the_api_must_not_wedge_the_symbol(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    a, b = register(api_client), register(api_client)
    big = 2**62
    for broker, side in ((a, "ask"), (b, "bid")):
        # Both are valid per the API schema (each field <= 2**63-1); the API answers 201.
        api_client.post(
            "/orders",
            json={"document_number": "1", "side": side, "symbol": symbol, "price": big, "quantity": 2},
            headers=broker.headers,
        )
    _drain(api_engine, symbol)

    # Ordinary orders on the same symbol, from anyone, afterwards:
    r1 = api_client.post(
        "/orders",
        json={"document_number": "1", "side": "ask", "symbol": symbol, "price": 100, "quantity": 1},
        headers=a.headers,
    )
    r2 = api_client.post(
        "/orders",
        json={"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 1},
        headers=b.headers,
    )
    assert r1.status_code == r2.status_code == 201
    _drain(api_engine, symbol)

    assert _pending_commands(api_engine, symbol) == 0, "the symbol is wedged: its command log no longer drains"
    view = api_client.get(f"/orders/{r2.json()['id']}", headers=b.headers).json()
    assert view["status"] == "closed"
    assert view["close_reason"] == "filled"


# ----------------------------------------------------------------------------------------------------------
# F2. Commands whose transactions commit out of seq order are applied in commit order, but the engine uses seq as
#     the FIFO priority and appends: the cached book then differs from the book rebuilt from Postgres (ORDER BY
#     priority), so who gets filled depends on whether the matcher process had the book cached.


def test_f2_a_late_committing_place_gets_the_same_queue_position_cached_or_rebuilt(engine: Engine) -> None:
    symbol = "LATE"
    early, late, seller = add_broker(engine, "early"), add_broker(engine, "late"), add_broker(engine, "seller")
    cache = BookCache()

    # An api request takes its seq (nextval) first but commits last (slow client, GC pause, pgbouncer queue ...).
    slow = engine.connect()
    slow_tx = slow.begin()
    slow_id = uuid.uuid4()
    slow_seq = slow.execute(text("SELECT nextval('command_seq')")).scalar_one()
    slow.execute(
        text(
            "INSERT INTO orders (id, broker_id, document_number, symbol, side, order_type, time_in_force, price, "
            "quantity, remaining, seq) VALUES (:id, :b, '1', :s, 'bid', 'limit', 'gtc', 100, 1, 1, :seq)"
        ),
        {"id": slow_id, "b": late, "s": symbol, "seq": slow_seq},
    )
    slow.execute(
        text("INSERT INTO commands (seq, symbol, kind, order_id) VALUES (:seq, :s, 'place', :id)"),
        {"seq": slow_seq, "s": symbol, "id": slow_id},
    )

    fast_id = place(engine, early, symbol, "bid", 1, 100)  # higher seq, commits first
    process_symbol(engine, cache, symbol)  # rests fast_id
    slow_tx.commit()
    slow.close()
    process_symbol(engine, cache, symbol)  # rests slow_id: appended BEHIND fast_id although its priority is lower

    with engine.connect() as conn:
        rebuilt = OrderBook.rebuild(symbol, store.open_orders(conn, [symbol])[symbol])
    cached = cache.books[symbol].book
    assert [o.order_id for o in cached.resting_orders()] == [o.order_id for o in rebuilt.resting_orders()], (
        "cached book and the book rebuilt from Postgres disagree on FIFO order within the 100 level"
    )
    assert cached.state_hash() == rebuilt.state_hash()

    # Consequence: the same incoming ask fills a different broker's order depending on the matcher's cache.
    place(engine, seller, symbol, "ask", 1, 100)
    process_symbol(engine, cache, symbol)
    with engine.connect() as conn:
        filled = conn.execute(
            text("SELECT id FROM orders WHERE symbol = :s AND side = 'bid' AND status = 'closed'"), {"s": symbol}
        ).scalar_one()
    assert filled == slow_id, "FIFO by command sequence (DESIGN §4) gives the lower seq priority"
    assert fast_id != slow_id


# ----------------------------------------------------------------------------------------------------------
# F3. A webhook URL that passes both SSRF checks but that httpx refuses (a control character in the path) makes
#     Deliverer.deliver raise: the event is never recorded as attempted/failed and is re-claimed forever.


def test_f3_an_accepted_webhook_url_httpx_refuses_ends_in_retry_or_failed_not_an_exception(engine: Engine) -> None:
    url = "http://93.184.215.14/hook\x01"  # a public literal IP: both SSRF checks accept it, no DNS needed
    from exchange.orders.brokers import check_webhook_url
    from exchange.orders.errors import InvalidWebhookUrlError
    from exchange.webhooks import ssrf

    # Registration now refuses control characters; a URL stored before that (or written by SQL) still reaches
    # delivery, where the SSRF guard accepts it and httpx refuses it.
    with pytest.raises(InvalidWebhookUrlError):
        check_webhook_url(url)
    ssrf.resolve_destination(url, allow_private=False)  # accepted by the delivery-time guard
    buyer, _ = broker_with_endpoint(engine, url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    result = deliverer(engine, allow_private=False).deliver(event.id)  # raises httpx.InvalidURL today

    assert result.outcome in (Outcome.RETRY, Outcome.FAILED)
    assert result.error is not None
    assert "InvalidURL" in result.error
    (after,) = events_of(engine, buyer)
    assert after.attempts == 1
    assert after.last_error == result.error


# ----------------------------------------------------------------------------------------------------------
# F4. Bad webhook URLs give 500 instead of 422 (UnicodeError from the IDNA codec escapes the SSRF check; a NUL in
#     PUT /webhooks/endpoint reaches PostgreSQL).


@pytest.mark.parametrize("url", ["http://a..example.com/", "http://" + "a" * 64 + ".example.com/"])
def test_f4_register_with_an_unencodable_host_is_422_not_500(api_client: TestClient[Any], url: str) -> None:
    response = api_client.post("/register", json={"name": "x", "webhook_url": url}, headers=ADMIN)
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("url", ["http://a..example.com/", "http://exa\x00mple.com/"])
def test_f4_put_endpoint_with_a_bad_url_is_422_not_500(api_client: TestClient[Any], url: str) -> None:
    broker = register(api_client)
    response = api_client.put("/webhooks/endpoint", json={"url": url}, headers=broker.headers)
    assert response.status_code == 422, response.text


# ----------------------------------------------------------------------------------------------------------
# F5. SSRF: the NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address (the module docstring says such
#     addresses are judged by their IPv4 part), but forbidden_reason only unwraps ::ffff:0:0/96 and 2002::/16.


@pytest.mark.parametrize("address", ["64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:1"])
def test_f5_nat64_embedded_private_addresses_are_forbidden(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None
