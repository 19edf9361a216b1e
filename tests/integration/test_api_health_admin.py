"""Health endpoints, admin debug endpoints, and how the api answers when a service is down."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg import sql
from sqlalchemy import Engine, text

from exchange.api.app import create_app
from exchange.config import Settings
from exchange.db.engines import pooled_engine
from exchange.matching.service import BookCache, process_symbol
from tests.integration.api_helpers import ADMIN_KEY, Broker, count, match, new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DEAD_POSTGRES = "postgresql://postgres@127.0.0.1:1/nothing"
DEAD_REDIS = "redis://127.0.0.1:1/0"


def test_health_and_live_answer_ok(api_client: TestClient[Any]) -> None:
    assert api_client.get("/health").json() == {"status": "ok"}
    assert api_client.get("/health/live").status_code == 200


def test_ready_is_200_when_postgres_and_redis_answer(api_client: TestClient[Any]) -> None:
    response = api_client.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["postgres"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is True
    assert body["checks"]["results"]["ok"] is True  # this process hears the matchers' results


def test_ready_is_503_naming_redis_when_redis_is_down(client_factory: Callable[..., TestClient[Any]]) -> None:
    client = client_factory(redis_url=DEAD_REDIS)
    response = client.get("/health/ready")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["postgres"]["ok"] is True
    assert checks["redis"]["ok"] is False
    assert checks["redis"]["error"]
    assert checks["results"]["ok"] is False  # nor can it hear a result: every new order would answer pending


def test_ready_is_503_and_requests_are_database_unavailable_when_postgres_is_down(
    client_factory: Callable[..., TestClient[Any]],
) -> None:
    client = client_factory(database_url=DEAD_POSTGRES)
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["postgres"]["ok"] is False
    assert ready.json()["checks"]["postgres"]["error"] == "OperationalError"  # not the server's address
    assert client.get("/health/live").status_code == 200
    for response in (
        client.post("/register", json={"name": "x"}, headers=ADMIN),
        client.get("/balance", headers={"Authorization": "Bearer exk_whatever"}),
        client.post("/orders", json={}, headers={"Authorization": "Bearer exk_whatever"}),
    ):
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "database_unavailable"


@pytest.fixture
def read_only_database_url(fresh_migrated_database_url: str, api_redis_url: str) -> tuple[str, Broker, str]:
    """A migrated database that refuses every write (``default_transaction_read_only``: what a standby a failover
    left behind, or an operator's maintenance switch, answers), a broker registered and an order of it placed before
    it did."""
    order = {"document_number": "1", "side": "bid", "symbol": new_symbol(), "price": 100, "quantity": 5}
    with TestClient(create_app(_debug_settings(fresh_migrated_database_url, api_redis_url))) as client:
        broker = register(client)
        order_id = client.post("/orders", json=order, headers=broker.headers).json()["id"]
    with psycopg.connect(fresh_migrated_database_url, autocommit=True) as conn:
        name = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
    return fresh_migrated_database_url, broker, order_id


def test_writes_to_a_read_only_database_are_503_database_unavailable(
    read_only_database_url: tuple[str, Broker, str], api_redis_url: str
) -> None:
    url, broker, order_id = read_only_database_url
    order = {"document_number": "1", "side": "bid", "symbol": new_symbol(), "price": 100, "quantity": 5}
    with TestClient(create_app(_debug_settings(url, api_redis_url))) as client:
        responses = [
            client.post("/orders", json=order, headers=broker.headers),
            client.post(f"/orders/{order_id}/cancel", headers=broker.headers),
            client.post("/register", json={"name": "x"}, headers=ADMIN),
        ]
    assert [(r.status_code, r.json()["code"]) for r in responses] == [(503, "database_unavailable")] * 3


def test_ready_is_503_naming_postgres_when_the_database_is_read_only(
    read_only_database_url: tuple[str, Broker, str], api_redis_url: str
) -> None:
    url, _, _ = read_only_database_url
    with TestClient(create_app(_debug_settings(url, api_redis_url))) as client:
        response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["postgres"]["ok"] is False
    assert "read-only" in response.json()["checks"]["postgres"]["error"]


def test_the_dramatiq_dashboard_is_503_redis_unavailable_when_redis_is_down(
    client_factory: Callable[..., TestClient[Any]],
) -> None:
    # The dashboard reads every queue from Redis: without it there is nothing to show (this was a 500).
    client = client_factory(redis_url=DEAD_REDIS)
    response = client.get("/ops/dramatiq/", headers=ADMIN)
    assert (response.status_code, response.json()["code"]) == (503, "redis_unavailable"), response.text


def test_an_order_is_accepted_with_201_when_redis_is_down(
    client_factory: Callable[..., TestClient[Any]], api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client)
    client = client_factory(redis_url=DEAD_REDIS)
    symbol = new_symbol()
    body = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 5}
    response = client.post("/orders", json=body, headers=broker.headers)
    assert response.status_code == 201
    assert response.json()["status"] == "pending"
    # The order and its command are durable; a matcher applies them whenever it gets to the symbol.
    match(api_engine, symbol)
    assert api_client.get(f"/orders/{response.json()['id']}", headers=broker.headers).json()["status"] == "open"


def test_trade_count_needs_the_admin_key(api_client: TestClient[Any]) -> None:
    assert api_client.get("/debug/trade-count").status_code == 401
    response = api_client.get("/debug/trade-count", headers=ADMIN)
    assert response.status_code == 200
    assert isinstance(response.json()["trade_count"], int)


def test_reset_is_404_unless_debug_endpoints_are_enabled(api_client: TestClient[Any], api_engine: Engine) -> None:
    register(api_client)
    response = api_client.post("/debug/reset", headers=ADMIN)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert count(api_engine, "SELECT count(*) FROM brokers") > 0


def test_reset_needs_the_admin_key_even_when_enabled(client_factory: Callable[..., TestClient[Any]]) -> None:
    client = client_factory(debug_endpoints="true")
    assert client.post("/debug/reset").status_code == 401


def _debug_settings(database_url: str, redis_url: str) -> Settings:
    """An app on its own database with the debug endpoints (``POST /debug/reset`` empties the database)."""
    return Settings.from_env(
        {
            "EXCHANGE_DATABASE_URL": database_url,
            "EXCHANGE_REDIS_URL": redis_url,
            "EXCHANGE_ADMIN_API_KEY": ADMIN_KEY,
            "EXCHANGE_ORDER_WAIT_MS": "0",
            "EXCHANGE_DEBUG_ENDPOINTS": "true",
        }
    )


def test_reset_empties_every_data_table_when_enabled(fresh_migrated_database_url: str, api_redis_url: str) -> None:
    settings = _debug_settings(fresh_migrated_database_url, api_redis_url)
    engine = pooled_engine(fresh_migrated_database_url)
    try:
        with TestClient(create_app(settings)) as client:
            seller, buyer = register(client), register(client)
            symbol = new_symbol()
            order = {"document_number": "1", "symbol": symbol, "price": 100, "quantity": 3}
            assert client.post("/orders", json={**order, "side": "ask"}, headers=seller.headers).status_code == 201
            assert client.post("/orders", json={**order, "side": "bid"}, headers=buyer.headers).status_code == 201
            match(engine, symbol)
            assert client.get("/debug/trade-count", headers=ADMIN).json() == {"trade_count": 1}

            response = client.post("/debug/reset", headers=ADMIN)
            assert response.status_code == 200
            for table in ("brokers", "orders", "commands", "trades", "positions", "webhook_events"):
                assert count(engine, f"SELECT count(*) FROM {table}") == 0, table
            assert count(engine, "SELECT count(*) FROM symbols WHERE last_price IS NOT NULL") == 0
            assert client.get("/debug/trade-count", headers=ADMIN).json() == {"trade_count": 0}
            # Old keys are gone with their brokers.
            assert client.get("/balance", headers=buyer.headers).status_code == 401
    finally:
        engine.dispose()


def test_ready_is_503_naming_results_when_the_result_subscriber_is_not_subscribed(
    client_factory: Callable[..., TestClient[Any]],
) -> None:
    """Redis up, but this process no longer hears the matchers' results (every new order would answer pending)."""
    client = client_factory()
    waiter = client.app.state.api.waiter
    client.blocking_portal.call(waiter.stop)  # the subscriber's task ends, as a lost subscription leaves it
    response = client.get("/health/ready")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["redis"]["ok"] is True
    assert checks["results"]["ok"] is False
    assert "subscriber" in checks["results"]["error"]


def test_amend_cancel_all_and_redeliver_answer_at_once_while_redis_stalls(
    client_factory: Callable[..., TestClient[Any]], api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    body = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 5}
    amended = api_client.post("/orders", json=body, headers=broker.headers).json()["id"]
    cancelled = api_client.post("/orders", json=body, headers=broker.headers).json()["id"]
    match(api_engine, symbol)
    with api_engine.begin() as conn:  # an endpoint and an event of the broker's to redeliver
        conn.execute(text("UPDATE brokers SET webhook_url = 'http://127.0.0.1:9/hook' WHERE id = :b"), {"b": broker.id})
        event_id = conn.execute(
            text(
                "INSERT INTO webhook_events (broker_id, sequence, type, payload) VALUES (:b, 1, 'order.fill', '{}') "
                "RETURNING id"
            ),
            {"b": broker.id},
        ).scalar_one()
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (the kernel does), never answers
        client = client_factory(redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0", order_wait_ms="100")
        took = []
        for method, path, payload in (
            ("PATCH", f"/orders/{amended}", {"quantity": 3}),
            ("DELETE", f"/orders?symbol={symbol}", None),
            ("POST", f"/webhooks/events/{event_id}/redeliver", None),
        ):
            start = time.monotonic()
            response = client.request(method, path, json=payload, headers=broker.headers)
            took.append(time.monotonic() - start)
            assert response.status_code in (200, 202), response.text

    assert max(took) < 2, took  # the broker's 10-s socket timeout, before
    assert count(api_engine, "SELECT count(*) FROM commands WHERE order_id = :o AND kind = 'amend'", o=amended) == 1
    assert count(api_engine, "SELECT count(*) FROM commands WHERE order_id = :o AND kind = 'cancel'", o=cancelled) == 1


def test_a_matcher_holding_a_book_from_before_a_reset_rebuilds_it(
    fresh_migrated_database_url: str, api_redis_url: str
) -> None:
    settings = _debug_settings(fresh_migrated_database_url, api_redis_url)
    engine = pooled_engine(fresh_migrated_database_url)
    symbol = new_symbol()
    first, second = BookCache(), BookCache()  # two matcher processes (a hot standby), each with its own books
    try:
        with TestClient(create_app(settings)) as client:

            def order(broker: Any, side: str, price: int) -> str:
                body = {"document_number": "1", "symbol": symbol, "side": side, "price": price, "quantity": 3}
                return str(client.post("/orders", json=body, headers=broker.headers).json()["id"])

            order(register(client), "ask", 100)
            process_symbol(engine, first, symbol)  # the first one holds a book with that ask resting
            assert client.post("/debug/reset", headers=ADMIN).status_code == 200
            seller, buyer = register(client), register(client)
            order(seller, "ask", 90)
            process_symbol(engine, second, symbol)  # the other one takes the symbol after the reset
            bid = order(buyer, "bid", 95)  # crosses the ask at 90, not the one at 100 that is gone
            process_symbol(engine, first, symbol)  # back to the first one, whose book is from before the reset

            got = client.get(f"/orders/{bid}", headers=buyer.headers).json()
        assert (got["status"], got["close_reason"]) == ("closed", "filled")  # with the old book: resting, crossed
        assert [(t["price"], t["counterparty_broker"]) for t in got["trades"]] == [(90, seller.name)]
    finally:
        engine.dispose()
